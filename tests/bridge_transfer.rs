#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Bridge transfer (issue 13 item 1, `mode: "bridge"`): the agent hands the caller to a
//! person, and the daemon calls that person itself through the tenant's transfer trunk
//! and joins the two legs (a B2BUA). The caller is SIPp with its media on a socket of
//! this test; the target is a second SIPp (tests/sipp/bridge_target_uas.xml) answering
//! in PCMA with its media on another socket of this test, so the bridge transcodes.
//!
//! - the target answers: the caller's speech reaches the target and the target's speech
//!   reaches the caller (audio correlation, each way), the agent got `accepted`,
//!   `progress` 180, `completed` 200 and then `stop`; when the caller hangs up, the
//!   bridge BYEs the target; both CDRs name each other's Call-ID;
//! - the target is busy (486): the agent gets `failed` (`target-failed`, 486) and keeps
//!   the caller (its connection stays open, caller audio still reaches it);
//! - the target rings past the trunk's answer timeout: CANCEL, `failed` (`no-answer`,
//!   487), the agent keeps the caller;
//! - a REFER the caller's side refuses falls back to a bridge transfer when the tenant
//!   says `transfer_fallback = "bridge"`.

mod agent_util;
mod common;

use common::test_agent::{Behaviour, ConnLog, TestAgent, events_named};
use common::{Daemon, ProfileSpec, SippResult, SippServer, repo_path, sipp_scenario};
use serde_json::{Value, json};
use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

/// The number the agent transfers to (a phone behind the `people` trunk).
const PERSON: &str = "+15557654321";

/// The daemon: tenant `demo` on a native agent at `agent_port`, with the disclosure
/// prompt only if it records (`record`: recording needs one); a
/// trunk `people` whose outbound proxy is `target` (answer timeout 2 s, digest
/// credentials for a target that challenges) is the tenant's transfer trunk. `tenant_extra` goes into the tenant.
fn daemon(agent_port: u16, target: SocketAddr, tenant_extra: &str, record: bool) -> Daemon {
    let pipeline =
        format!(r#"pipeline = {{ kind = "agent", url = "ws://127.0.0.1:{agent_port}/agent" }}"#);
    let tenant = format!("transfer_trunk = \"people\"\n{tenant_extra}");
    let extra = format!(
        "[[trunk]]\nname = \"people\"\nallow = [\"192.0.2.0/24\"]\ntenant = \"demo\"\n\n\
         [trunk.outbound]\nproxy = \"{target}\"\nanswer_timeout_s = 2\n\
         username = \"acme-out\"\npassword = \"env:OUT_PASSWORD\"\n"
    );
    let spec = ProfileSpec {
        tenant: &tenant,
        extra: &extra,
        ..ProfileSpec::default()
    };
    let profile: String = spec
        .render()
        .replacen(r#"pipeline = { kind = "echo" }"#, &pipeline, 1)
        .replacen(
            "recording = false\n",
            if record {
                "recording = true\n"
            } else {
                "recording = false\n"
            },
            1,
        )
        .lines()
        .filter(|l| record || !l.starts_with("prompt = "))
        .collect::<Vec<_>>()
        .join("\n");
    Daemon::spawn_with_env(&profile, &[("OUT_PASSWORD", TRUNK_PASSWORD)])
}

/// The `people` trunk's digest password (tests/sipp/outbound_uas_digest.xml checks it).
const TRUNK_PASSWORD: &str = "hunter2";

/// The agent's message, kept for the whole test (the scripted agent takes `&'static`).
fn say(v: Value) -> &'static str {
    Box::leak(v.to_string().into_boxed_str())
}

/// A native agent that asks for a bridge transfer to [`PERSON`] right after `start`,
/// then only listens.
fn bridging_agent() -> TestAgent {
    TestAgent::spawn(vec![Behaviour::SayAfterStart(say(
        json!({"event": "transfer", "to": PERSON, "mode": "bridge"}),
    ))])
}

/// The `transfer` events the agent's connections got.
fn transfer_events(conns: &[ConnLog]) -> Vec<Value> {
    events_named(conns, "transfer")
}

/// Each `transfer` event's `result` and `status`, in order.
fn steps(conns: &[ConnLog]) -> Vec<(Value, Value)> {
    transfer_events(conns)
        .iter()
        .map(|e| (e["result"].clone(), e["status"].clone()))
        .collect()
}

/// The caller: SIPp with its media on `media`, hanging up `hold_ms` after the answer.
fn caller(daemon: &Daemon, media: &UdpSocket, hold_ms: u32) -> thread::JoinHandle<SippResult> {
    common::sipp_caller(daemon, "media_on_test_socket.xml", media, hold_ms)
}

/// A-law from linear, from the G.711 formula (sign bit set for positive values, even
/// bits inverted).
fn alaw_encode(sample: i16) -> u8 {
    let (sign, mag) = if sample >= 0 {
        (0x80u8, i32::from(sample))
    } else {
        (0, -i32::from(sample) - 1)
    };
    let mag = mag.min(0x7fff);
    let mut exponent = 7u8;
    let mut mask = 0x4000;
    while exponent > 0 && mag & mask == 0 {
        exponent -= 1;
        mask >>= 1;
    }
    let shift = if exponent == 0 { 4 } else { exponent + 3 };
    let mantissa = ((mag >> shift) & 0x0f) as u8;
    (sign | (exponent << 4) | mantissa) ^ 0x55
}

/// Linear from A-law.
fn alaw_decode(code: u8) -> i16 {
    let a = code ^ 0x55;
    let exponent = (a >> 4) & 7;
    let mantissa = i32::from(a & 0x0f);
    let mut mag = (mantissa << 4) + 8;
    if exponent > 0 {
        mag = (mag + 0x100) << (exponent - 1);
    }
    if a & 0x80 != 0 {
        mag as i16
    } else {
        -mag as i16
    }
}

/// One side's media: waits for the bridge's first packet on `sock` (that is where it
/// sends from), then sends `payloads` in paced 20 ms packets of payload type `pt` and
/// keeps receiving until `listen` has passed; returns the payloads received with `pt`.
fn talk(sock: &UdpSocket, payloads: Vec<Vec<u8>>, pt: u8, listen: Duration) -> Vec<Vec<u8>> {
    let mut buf = [0u8; 2048];
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (_, bridge) = sock.recv_from(&mut buf).expect("no RTP from the bridge");
    let start = Instant::now();
    let mut heard = Vec::new();
    let mut next = 0usize;
    while start.elapsed() < listen {
        let due = start + Duration::from_millis(20 * next as u64);
        if next < payloads.len() && Instant::now() >= due {
            let mut packet = vec![0x80, pt];
            packet.extend_from_slice(&(next as u16).to_be_bytes());
            packet.extend_from_slice(&((next as u32) * 160).to_be_bytes());
            packet.extend_from_slice(&0x0bad_cafe_u32.to_be_bytes());
            packet.extend_from_slice(&payloads[next]);
            sock.send_to(&packet, bridge).unwrap();
            next += 1;
            continue;
        }
        let wait = if next < payloads.len() {
            due.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(20)
        };
        sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && n == 12 + 160
            && buf[1] & 0x7f == pt
        {
            heard.push(buf[12..n].to_vec());
        }
    }
    heard
}

/// A fixture as linear samples.
fn fixture(name: &str) -> Vec<i16> {
    std::fs::read(repo_path(&format!("fixtures/audio/{name}")))
        .unwrap()
        .iter()
        .map(|&c| agent_util::ulaw_decode(c))
        .collect()
}

/// The call's recording, decrypted: left and right channels.
fn recording_of(daemon: &Daemon, call_id: &str) -> (Vec<i16>, Vec<i16>) {
    use sipbridge::store::db::{RecordingState, Store};
    let var = daemon.dir().join("var");
    let deadline = Instant::now() + Duration::from_secs(10);
    let rec = loop {
        let recs = Store::open(&var.join("sipbridge.db"))
            .unwrap()
            .recordings_of_call("demo", call_id)
            .unwrap();
        if let Some(r) = recs
            .into_iter()
            .find(|r| r.state == RecordingState::Complete)
        {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no complete recording of {call_id}"
        );
        thread::sleep(Duration::from_millis(50));
    };
    let master = std::fs::read(var.join("master.key")).unwrap();
    let keys = sipbridge::store::crypto::KeyRing::open(&var, &master).unwrap();
    let wav = sipbridge::store::recording::export_wav(&rec.path, &keys).unwrap();
    let mut reader = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
    assert_eq!(reader.spec().channels, 2);
    let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    let left = samples.iter().step_by(2).copied().collect();
    let right = samples.iter().skip(1).step_by(2).copied().collect();
    (left, right)
}

#[test]
fn bridge_transfer_joins_caller_and_target_both_ways_and_links_the_cdrs() {
    let target_media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = SippServer::spawn_with_media("bridge_target_uas.xml", &target_media);
    let agent = bridging_agent();
    let daemon = daemon(agent.port(), target.addr(), "", true);
    let caller_media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let run = caller(&daemon, &caller_media, 14_000);
    assert!(
        daemon
            .wait_for_log(Duration::from_secs(15), |l| l.contains("\"transfer\"")
                && l.contains("completed"))
            .is_some(),
        "the transfer did not complete:\n{}",
        daemon.logs().join("\n")
    );
    // The agent asked at once, so the transfer completed while the disclosure played:
    // the caller's audio reaches the target only once it has finished, like any pipeline.
    assert!(
        daemon
            .wait_for_log(Duration::from_secs(10), |l| l
                .contains("disclosure prompt finished"))
            .is_some()
    );

    // Each side speaks its fixture (3 s) and listens for 6 s.
    let speech1 = fixture("caller1.ulaw");
    let speech2 = fixture("caller2.ulaw");
    let caller_side = {
        let sock = caller_media.try_clone().unwrap();
        let frames: Vec<Vec<u8>> = std::fs::read(repo_path("fixtures/audio/caller1.ulaw"))
            .unwrap()
            .chunks_exact(160)
            .map(<[u8]>::to_vec)
            .collect();
        thread::spawn(move || talk(&sock, frames, 0, Duration::from_secs(6)))
    };
    let target_side = {
        let sock = target_media.try_clone().unwrap();
        let frames: Vec<Vec<u8>> = speech2
            .chunks_exact(160)
            .map(|c| c.iter().map(|&s| alaw_encode(s)).collect())
            .collect();
        thread::spawn(move || talk(&sock, frames, 8, Duration::from_secs(6)))
    };
    let at_caller: Vec<i16> = caller_side
        .join()
        .unwrap()
        .iter()
        .flatten()
        .map(|&c| agent_util::ulaw_decode(c))
        .collect();
    let at_target: Vec<i16> = target_side
        .join()
        .unwrap()
        .iter()
        .flatten()
        .map(|&c| alaw_decode(c))
        .collect();
    let (to_target, pieces) = common::audio::pieces_found(&at_target, &speech1);
    eprintln!("caller's speech at the target: {to_target:.2} of pieces {pieces:.3?}");
    assert!(to_target >= 0.8, "the target heard {pieces:.3?}");
    let (to_caller, pieces) = common::audio::pieces_found(&at_caller, &speech2);
    eprintln!("target's speech at the caller: {to_caller:.2} of pieces {pieces:.3?}");
    assert!(to_caller >= 0.8, "the caller heard {pieces:.3?}");

    // The caller hangs up; the bridge BYEs the target.
    run.join().unwrap().assert_success();
    let target_run = target.finish();
    target_run.assert_success();

    let caller_cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["direction"] == "inbound")
        .expect("the caller's CDR");
    assert_eq!(caller_cdr["cause"], "caller-bye", "{caller_cdr}");
    let t = &caller_cdr["transfer"];
    assert_eq!(
        (&t["mode"], &t["result"], &t["status"]),
        (&json!("bridge"), &json!("completed"), &json!(200)),
        "{caller_cdr}"
    );
    let leg_id = t["leg_call_id"].as_str().expect("the target leg's Call-ID");
    let target_cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["call_id"] == leg_id)
        .expect("the target leg's CDR");
    assert_eq!(target_cdr["direction"], "outbound", "{target_cdr}");
    assert_eq!(target_cdr["result_code"], 200, "{target_cdr}");
    assert_eq!(target_cdr["cause"], "bridged-leg-ended", "{target_cdr}");
    assert_eq!(target_cdr["codec"], "PCMA", "{target_cdr}");
    assert_eq!(
        target_cdr["transfer"]["leg_call_id"], caller_cdr["call_id"],
        "{target_cdr}"
    );
    // In the database too, each row names the other leg.
    let caller_id = caller_cdr["call_id"].as_str().unwrap();
    let caller_row = daemon.stored_cdr(caller_id);
    let t = caller_row.transfer.expect("the caller's transfer columns");
    assert_eq!(
        (t.mode.as_str(), t.result.as_str(), t.leg_call_id.as_deref()),
        ("bridge", "completed", Some(leg_id))
    );
    let leg_row = daemon.stored_cdr(leg_id);
    assert_eq!(leg_row.direction, "outbound");
    assert_eq!(leg_row.cause.as_deref(), Some("bridged-leg-ended"));
    assert_eq!(
        leg_row.transfer.and_then(|t| t.leg_call_id).as_deref(),
        Some(caller_id)
    );
    // The BYE the target got is in the target leg's dialog.
    assert!(
        target_run.messages.contains(&format!("Call-ID: {leg_id}")),
        "{}",
        target_run.messages
    );

    // The caller's recording goes on after the transfer, both sides: the caller on the
    // left, the target (as the caller heard it) on the right.
    assert_eq!(caller_cdr["recording"], "recorded", "{caller_cdr}");
    let (left, right) = recording_of(&daemon, caller_cdr["call_id"].as_str().unwrap());
    let (caller_in_recording, pieces) = common::audio::pieces_found(&left, &speech1);
    assert!(caller_in_recording >= 0.8, "left: {pieces:.3?}");
    let (target_in_recording, pieces) = common::audio::pieces_found(&right, &speech2);
    assert!(target_in_recording >= 0.8, "right: {pieces:.3?}");

    let conns = agent.finish();
    assert_eq!(conns.len(), 1);
    assert_eq!(
        steps(&conns),
        vec![
            (json!("accepted"), Value::Null),
            (json!("progress"), json!(180)),
            (json!("completed"), json!(200)),
        ]
    );
    assert_eq!(
        conns[0].texts.last().unwrap()["event"],
        "stop",
        "the agent's connection ends after the result"
    );
}

/// A failed bridge transfer: the agent gets `failed` with `reason` and `status`, keeps
/// its connection (caller audio still reaches it after the failure), and the caller's
/// CDR says so.
fn failed_transfer_keeps_the_caller(scenario: &str, reason: &str, status: u16) {
    let target = SippServer::spawn(&["-sf", sipp_scenario(scenario).to_str().unwrap()]);
    let agent = bridging_agent();
    let daemon = daemon(agent.port(), target.addr(), "", false);
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let run = caller(&daemon, &media, 6000);
    let failed = daemon
        .wait_for_log(Duration::from_secs(15), |l| {
            l.contains("\"transfer\"") && l.contains("\"result\":\"failed\"")
        })
        .unwrap_or_else(|| panic!("no failed transfer:\n{}", daemon.logs().join("\n")));
    assert!(failed.contains(reason), "{failed}");
    // The caller speaks after the failure: the agent still hears it.
    let frames: Vec<Vec<u8>> = std::fs::read(repo_path("fixtures/audio/caller1.ulaw"))
        .unwrap()
        .chunks_exact(160)
        .take(50)
        .map(<[u8]>::to_vec)
        .collect();
    talk(&media, frames, 0, Duration::from_secs(2));
    run.join().unwrap().assert_success();
    target.finish().assert_success();

    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["direction"] == "inbound")
        .expect("the caller's CDR");
    assert_eq!(cdr["cause"], "caller-bye", "{cdr}");
    assert_eq!(
        (
            &cdr["transfer"]["mode"],
            &cdr["transfer"]["result"],
            &cdr["transfer"]["reason"],
            &cdr["transfer"]["status"]
        ),
        (
            &json!("bridge"),
            &json!("failed"),
            &json!(reason),
            &json!(status)
        ),
        "{cdr}"
    );
    let conns = agent.finish();
    assert_eq!(conns.len(), 1, "one connection: the agent kept the call");
    let events = transfer_events(&conns);
    let last = events.last().unwrap();
    assert_eq!(
        (&last["result"], &last["reason"], &last["status"]),
        (&json!("failed"), &json!(reason), &json!(status)),
        "{events:?}"
    );
    // Caller audio reached the agent after the failure (1 s of speech: 50 frames).
    // (The caller sent nothing before: every frame the agent got came after.)
    assert!(conns[0].frames >= 45, "{} frames", conns[0].frames);
    assert_eq!(conns[0].texts.last().unwrap()["event"], "stop");
}

#[test]
fn busy_target_fails_back_to_the_agent_which_keeps_the_caller() {
    failed_transfer_keeps_the_caller("transfer_target_busy.xml", "target-failed", 486);
}

#[test]
fn target_that_never_answers_is_cancelled_and_the_agent_keeps_the_caller() {
    failed_transfer_keeps_the_caller("outbound_uas_ringing.xml", "no-answer", 487);
}

#[test]
fn a_refused_refer_falls_back_to_a_bridge_transfer_when_the_tenant_allows() {
    // The target's side challenges (401) and checks the trunk's digest answer.
    let target_media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = SippServer::spawn_with_media("outbound_uas_digest.xml", &target_media);
    let agent = TestAgent::spawn(vec![Behaviour::SayAfterStart(say(
        json!({"event": "transfer", "to": PERSON, "mode": "blind"}),
    ))]);
    let daemon = daemon(
        agent.port(),
        target.addr(),
        "transfer_fallback = \"bridge\"\n",
        false,
    );
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let result = common::sipp_caller(&daemon, "transfer_carrier_refuse.xml", &media, 3000)
        .join()
        .unwrap();
    result.assert_success();
    // The REFER went out first, and was refused.
    assert!(
        result.messages.contains("Refer-To: <tel:+15557654321>"),
        "{}",
        result.messages
    );
    // Then the daemon called the target itself, and BYEd it when the caller left.
    target.finish().assert_success();
    let conns = agent.finish();
    let steps: Vec<(Value, Value, Value)> = transfer_events(&conns)
        .iter()
        .map(|e| (e["mode"].clone(), e["result"].clone(), e["status"].clone()))
        .collect();
    assert_eq!(
        steps,
        vec![
            (json!("blind"), json!("failed"), json!(403)),
            (json!("bridge"), json!("accepted"), Value::Null),
            (json!("bridge"), json!("progress"), json!(180)),
            (json!("bridge"), json!("completed"), json!(200)),
        ]
    );
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["direction"] == "inbound")
        .expect("the caller's CDR");
    assert_eq!(cdr["transfer"]["mode"], "bridge", "{cdr}");
    assert_eq!(cdr["transfer"]["result"], "completed", "{cdr}");
    for line in daemon.logs() {
        assert!(
            !line.contains(TRUNK_PASSWORD),
            "the trunk password logged: {line}"
        );
    }
}

/// The example agent (examples/transfer_agent.py, in the test venv that
/// scripts/install-test-deps.sh makes) with `TRANSFER_MODE=bridge`.
#[test]
fn example_agent_bridges_the_caller_to_a_person() {
    let target_media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = SippServer::spawn_with_media("bridge_target_uas.xml", &target_media);
    let agent = common::ExampleAgent::spawn(
        "transfer_agent.py",
        &[("TRANSFER_TO", PERSON), ("TRANSFER_MODE", "bridge")],
    );
    let port = agent.port();
    let daemon = daemon(port, target.addr(), "", false);
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    caller(&daemon, &media, 3000)
        .join()
        .unwrap()
        .assert_success();
    target.finish().assert_success();
    let lines = agent.lines_until_stopped();
    let steps: Vec<&Value> = lines.iter().filter_map(|l| l.get("transfer")).collect();
    assert_eq!(
        steps,
        vec![&json!("accepted"), &json!("progress"), &json!("completed")],
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l["stopped"] == true), "{lines:?}");
}

/// Share of a frame's energy at `freq` (Goertzel over the frame, 8 kHz).
fn tone_share(frame: &[i16], freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / 8000.0;
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    let mut energy = 0.0;
    for &x in frame {
        let x = f64::from(x);
        let s = x + 2.0 * w.cos() * s1 - s2;
        s2 = s1;
        s1 = s;
        energy += x * x;
    }
    let power = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
    if energy == 0.0 {
        0.0
    } else {
        2.0 * power / (energy * frame.len() as f64)
    }
}

#[test]
fn the_targets_ringback_reaches_the_caller_while_the_agent_is_silent() {
    let target_media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = SippServer::spawn_with_media("bridge_target_early_busy.xml", &target_media);
    // The agent asks for the transfer and then says nothing.
    let agent = bridging_agent();
    let daemon = daemon(agent.port(), target.addr(), "", false);
    let caller_media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let run = caller(&daemon, &caller_media, 6000);
    // 1.6 s of a 425 Hz ringback tone from the target's side, once the bridge's early
    // media session sends to it (the target is busy after 1.9 s).
    let ringback: Vec<Vec<u8>> = (0..80)
        .map(|f| {
            (0..160)
                .map(|i| {
                    let t = f64::from(f * 160 + i) / 8000.0;
                    let s = 6000.0 * (2.0 * std::f64::consts::PI * 425.0 * t).sin();
                    agent_util::ulaw_encode(s as i16)
                })
                .collect()
        })
        .collect();
    let ringing = {
        let sock = target_media.try_clone().unwrap();
        thread::spawn(move || talk(&sock, ringback, 0, Duration::from_millis(1800)))
    };
    let heard = talk(&caller_media, Vec::new(), 0, Duration::from_secs(4));
    ringing.join().unwrap();
    let tonal = heard
        .iter()
        .filter(|p| {
            let pcm: Vec<i16> = p.iter().map(|&c| agent_util::ulaw_decode(c)).collect();
            pcm.iter().any(|s| s.unsigned_abs() > 64) && tone_share(&pcm, 425.0) > 0.8
        })
        .count();
    assert!(tonal >= 60, "{tonal} packets of ringback at the caller");
    run.join().unwrap().assert_success();
    target.finish().assert_success();
    let conns = agent.finish();
    assert_eq!(
        steps(&conns),
        vec![
            (json!("accepted"), Value::Null),
            (json!("progress"), json!(183)),
            (json!("failed"), json!(486)),
        ]
    );
}
