#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Outbound calls (issue 13 acceptance) against real peers on loopback: a tenant's
//! `POST /v1/calls` dials a SIPp UAS through a digest trunk (401, then the INVITE
//! with credentials SIPp verifies), the answered party hears the disclosure prompt
//! and then the agent (audio on the test's own RTP socket), the agent's `start`
//! says `direction: outbound` with the request's `custom` parameters, `GET` shows
//! the state, `DELETE` puts a BYE on the wire, the CDR says `direction: outbound`;
//! another tenant's token cannot dial on the trunk (403); a second call at once
//! is over the tenant's `max_outbound_cps` (429 + Retry-After); a far end that
//! never answers is CANCELled at the answer timeout (CDR 487 `no-answer`); the
//! trunk password never reaches a log line; `sipbridge dial` places a call.

mod agent_util;
mod common;

use common::http;
use common::{Daemon, ProfileSpec, SippServer, repo_path, sipp_scenario};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sipbridge::media::g711::mu_to_linear;
use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const DEMO_TOKEN: &str = "sbt_ZGVtby1vdXRib3VuZC10b2tlbi0x";
const GLOBEX_TOKEN: &str = "sbt_Z2xvYmV4LW91dGJvdW5kLXRva2Vu";
const TRUNK_PASSWORD: &str = "hunter2";

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// `demo` (agent at `agent_url`, or echo) and `globex`, each with a token; trunk
/// `carrier` dials `proxy` for `demo` only, with digest credentials when asked.
fn profile(proxy: SocketAddr, agent_url: Option<&str>, credentials: bool) -> String {
    let pipeline = match agent_url {
        Some(url) => format!(r#"pipeline = {{ kind = "agent", url = "{url}", mode = "native" }}"#),
        None => r#"pipeline = { kind = "echo" }"#.to_owned(),
    };
    let creds = if credentials {
        "username = \"acme-out\"\npassword = \"env:OUT_PASSWORD\"\n"
    } else {
        ""
    };
    let extra = format!(
        "[[tenant]]\nid = \"globex\"\nrecording = false\ntranscripts = false\n\
         pipeline = {{ kind = \"echo\" }}\nadmin_token_sha256 = \"{}\"\n\n\
         [[trunk]]\nname = \"carrier\"\nallow = [\"192.0.2.0/24\"]\ntenant = \"demo\"\n\n\
         [trunk.outbound]\nproxy = \"{proxy}\"\nfrom_domain = \"sipbridge.test\"\n{creds}",
        sha256_hex(GLOBEX_TOKEN)
    );
    let tenant = format!(
        "caller_audio_after_prompt = false\nadmin_token_sha256 = \"{}\"\n",
        sha256_hex(DEMO_TOKEN)
    );
    let spec = ProfileSpec {
        tenant: &tenant,
        extra: &extra,
        ..ProfileSpec::default()
    };
    let text = spec
        .render()
        .replacen(r#"pipeline = { kind = "echo" }"#, &pipeline, 1)
        .replace(
            "[profile.sip]",
            "[profile.admin]\nlisten = \"127.0.0.1:0\"\n\n[profile.sip]",
        );
    assert!(text.contains("[trunk.outbound]"), "{text}");
    text
}

fn place(admin: SocketAddr, token: &str, body: &Value) -> http::Response {
    http::request(
        admin,
        "POST",
        "/v1/calls",
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
}

/// 1 s of a 1 kHz tone at 16 kHz.
fn tone_16k() -> Vec<i16> {
    (0..16_000)
        .map(|i| {
            let t = f64::from(i) / 16_000.0;
            (8000.0 * (2.0 * std::f64::consts::PI * 1000.0 * t).sin()) as i16
        })
        .collect()
}

/// Power of the 1 kHz bin in one 8 kHz frame relative to its energy (Goertzel).
fn tone_ratio(frame: &[f64]) -> f64 {
    let k = 2.0 * (2.0 * std::f64::consts::PI * 1000.0 / 8000.0).cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for &x in frame {
        let s = x + k * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    let power = s1 * s1 + s2 * s2 - k * s1 * s2;
    let energy: f64 = frame.iter().map(|x| x * x).sum();
    if energy == 0.0 {
        0.0
    } else {
        2.0 * power / (energy * frame.len() as f64)
    }
}

/// A native agent that sends 1 s of tone right after `start` and returns the
/// `start` message once the bridge closes the connection (or after 40 s).
fn spawn_agent() -> (u16, thread::JoinHandle<Option<Value>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let handle = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let Ok(Ok((stream, _))) =
                tokio::time::timeout(Duration::from_secs(30), listener.accept()).await
            else {
                return None;
            };
            let mut ws = tokio_tungstenite::accept_async(stream).await.ok()?;
            let mut start = None;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
            while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, ws.next()).await {
                match msg {
                    Message::Text(text) => {
                        let v: Value = serde_json::from_str(&text).unwrap();
                        if v["event"] == "start" {
                            start = Some(v);
                            for chunk in tone_16k().chunks(320) {
                                let bytes: Vec<u8> =
                                    chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
                                ws.send(Message::binary(bytes)).await.unwrap();
                            }
                        }
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            start
        })
    });
    (port, handle)
}

/// PCMU frames received on `media` until `limit` passed or 2 s of silence after some.
fn capture(media: &UdpSocket, limit: Duration) -> Vec<Vec<f64>> {
    media
        .set_read_timeout(Some(Duration::from_millis(2000)))
        .unwrap();
    let mut frames = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match media.recv_from(&mut buf) {
            Ok((n, _)) if n == 12 + 160 && buf[1] & 0x7f == 0 => frames.push(
                buf[12..n]
                    .iter()
                    .map(|&c| f64::from(mu_to_linear(c)))
                    .collect(),
            ),
            Ok(_) => {}
            Err(_) if !frames.is_empty() => break,
            Err(_) => {}
        }
    }
    frames
}

/// The stored CDR as `GET /v1/cdrs/{id}` shows it, once the writer has closed it.
fn stored_cdr(admin: SocketAddr, call_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http::get(admin, &format!("/v1/cdrs/{call_id}"), Some(DEMO_TOKEN));
        if r.status == 200 && !r.json()["ended_at"].is_null() {
            return r.json();
        }
        assert!(
            Instant::now() < deadline,
            "no closed CDR row: {} {}",
            r.status,
            r.text()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn assert_password_not_logged(daemon: &Daemon) {
    for line in daemon.logs() {
        assert!(
            !line.contains(TRUNK_PASSWORD),
            "trunk password logged: {line}"
        );
        assert!(!line.contains(DEMO_TOKEN), "token logged: {line}");
    }
}

#[test]
fn api_call_through_a_digest_trunk_hears_the_disclosure_then_the_agent() {
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let media_port = media.local_addr().unwrap().port().to_string();
    let scenario = sipp_scenario("outbound_uas_digest.xml");
    let uas = SippServer::spawn(&[
        "-sf",
        scenario.to_str().unwrap(),
        "-key",
        "test_rtp_port",
        &media_port,
    ]);
    let (agent_port, agent) = spawn_agent();
    let daemon = Daemon::spawn_with_env(
        &profile(
            uas.addr(),
            Some(&format!("ws://127.0.0.1:{agent_port}/agent")),
            true,
        ),
        &[("OUT_PASSWORD", TRUNK_PASSWORD)],
    );
    let admin = daemon.admin_addr();
    let request = json!({
        "to": "+15557654321",
        "from": "+15551230000",
        "trunk": "carrier",
        "custom": {"campaign": "spring"},
        "answer_timeout_s": 20,
    });

    // Tenant B's token cannot dial on tenant A's trunk.
    let refused = place(admin, GLOBEX_TOKEN, &request);
    assert_eq!(refused.status, 403, "{}", refused.text());

    let placed = place(admin, DEMO_TOKEN, &request);
    assert_eq!(placed.status, 201, "{}", placed.text());
    let body = placed.json();
    let call_id = body["call_id"].as_str().unwrap().to_owned();
    assert_eq!(body["direction"], "outbound");
    assert_eq!(body["tenant"], "demo");

    // A second call at once is over max_outbound_cps (1): 429 with Retry-After.
    let again = place(admin, DEMO_TOKEN, &request);
    assert_eq!(again.status, 429, "{}", again.text());
    assert_eq!(again.header("retry-after"), Some("1"));

    // Prompt (4.4 s), then the agent's 1 s tone: 7 s of media, then hang up.
    let capture_thread = {
        let media = media.try_clone().unwrap();
        thread::spawn(move || capture(&media, Duration::from_secs(7)))
    };
    let frames = capture_thread.join().unwrap();
    let detail = http::get(admin, &format!("/v1/calls/{call_id}"), Some(DEMO_TOKEN));
    assert_eq!(detail.status, 200, "{}", detail.text());
    assert_eq!(detail.json()["state"], "answered");
    let hang = http::request(
        admin,
        "DELETE",
        &format!("/v1/calls/{call_id}"),
        &[("Authorization", &format!("Bearer {DEMO_TOKEN}"))],
        b"",
    );
    assert_eq!(hang.status, 202, "{}", hang.text());
    // SIPp got the BYE (and had verified the digest answer).
    uas.finish().assert_success();

    // The disclosure first: the received audio matches the prompt file.
    let prompt =
        sipbridge::media::prompt::Prompt::load(repo_path("sip-profiles/prompts/disclosure.wav"))
            .unwrap();
    let prompt_pcm: Vec<f64> = prompt.pcm8k().iter().map(|&s| f64::from(s)).collect();
    let heard: Vec<f64> = frames.iter().flatten().copied().collect();
    assert!(
        heard.len() > prompt_pcm.len(),
        "only {} samples heard",
        heard.len()
    );
    let first_second = &prompt_pcm[..8000];
    let (score, lag) = agent_util::best_ncc(&heard[..heard.len().min(16_000)], first_second);
    assert!(
        score > 0.9,
        "prompt not heard first: ncc {score} at lag {lag}"
    );
    // Then the agent: 1 s of tone (50 packets), after the prompt's packets.
    let tonal: Vec<bool> = frames.iter().map(|f| tone_ratio(f) > 0.9).collect();
    let first_tone = tonal.iter().position(|&t| t).expect("agent's tone heard");
    let prompt_packets = prompt_pcm.len() / 160;
    assert!(
        first_tone + 2 >= prompt_packets,
        "tone at packet {first_tone}, before the prompt's end ({prompt_packets})"
    );
    let longest = tonal.split(|&t| !t).map(<[bool]>::len).max().unwrap_or(0);
    assert!((48..=51).contains(&longest), "tone run {longest} packets");

    let start = agent.join().unwrap().expect("agent got start");
    assert_eq!(start["direction"], "outbound");
    assert_eq!(start["call_id"], call_id.as_str());
    assert_eq!(start["to"], "+15557654321");
    assert_eq!(start["from"], "+15551230000");
    assert_eq!(start["custom"], json!({"campaign": "spring"}));

    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| {
            c["call_id"] == call_id.as_str()
        })
        .expect("CDR of the outbound call");
    assert_eq!(cdr["direction"], "outbound");
    assert_eq!(cdr["result_code"], 200);
    assert_eq!(cdr["cause"], "local-hangup");
    assert_eq!(cdr["trunk"], "carrier");
    let row = stored_cdr(admin, &call_id);
    assert_eq!(row["direction"], "outbound");
    assert_eq!(row["result_code"], 200);
    assert_password_not_logged(&daemon);
}

#[test]
fn a_far_end_that_never_answers_is_cancelled_at_the_answer_timeout() {
    let scenario = sipp_scenario("outbound_uas_ringing.xml");
    let uas = SippServer::spawn(&["-sf", scenario.to_str().unwrap()]);
    let daemon = Daemon::spawn(&profile(uas.addr(), None, false));
    let admin = daemon.admin_addr();
    // Placed with the CLI (`sipbridge dial`), which prints the status line and the body.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args([
            "dial",
            "--api",
            &format!("http://{admin}"),
            "--to",
            "tel:+15557654321",
            "--from",
            "+15551230000",
            "--trunk",
            "carrier",
            "--answer-timeout-s",
            "2",
        ])
        .env("SIPBRIDGE_TOKEN", DEMO_TOKEN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    assert!(lines.next().unwrap().contains(" 201 "), "{stdout}");
    let placed: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let call_id = placed["call_id"].as_str().unwrap().to_owned();
    // SIPp saw 180 out, then CANCEL, and the ACK for its 487.
    uas.finish().assert_success();
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| {
            c["call_id"] == call_id.as_str()
        })
        .expect("CDR of the unanswered call");
    assert_eq!(cdr["direction"], "outbound");
    assert_eq!(cdr["result_code"], 487);
    assert_eq!(cdr["cause"], "no-answer");
    let row = stored_cdr(admin, &call_id);
    assert_eq!(row["direction"], "outbound");
    assert_eq!(row["result_code"], 487);
    // Gone from the live calls.
    let detail = http::get(admin, &format!("/v1/calls/{call_id}"), Some(DEMO_TOKEN));
    assert_eq!(detail.status, 404);
}
