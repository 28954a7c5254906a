#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Call event webhooks through the real daemon (issue 13 item 4's acceptance): SIPp is
//! the carrier, a local HTTPS receiver (tokio-rustls, certificate from a test CA the
//! tenant trusts with `events_ca`) records every POST.
//!
//! Covers: a recorded call's `call.started`, `call.answered`, `call.ended` and
//! `recording.ready` arrive in order, each with a valid `Sipbridge-Signature` (checked
//! here with HMAC-SHA256 directly, not the daemon's code), valid against
//! docs/events.schema.json, numbers masked as in the CDR log, the recording's id and
//! size as in the database; a receiver that is down (port closed, then answering 500)
//! does not stop the call from completing normally, and gets every event, in order,
//! once it is back; a queue of one event drops the oldest and counts it in /metrics.

mod common;

#[path = "common/json_schema.rs"]
mod json_schema;

use common::{Daemon, ProfileSpec, free_port, http, repo_path, sipp, sipp_scenario};
use hmac::{Hmac, KeyInit, Mac};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use sha2::Sha256;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const NUMBER: &str = "+15551234567";
const SECRET: &str = "whsec-test-0123456789abcdef";

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    /// The request target (path and query).
    target: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    /// What the receiver answered.
    status: u16,
}

impl Hit {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    fn kind(&self) -> String {
        self.json()["type"].as_str().unwrap().to_owned()
    }
}

/// The test CA (PEM, written to `ca.pem` in the test's directory) and a leaf for
/// 127.0.0.1 it signed.
struct Pki {
    ca_path: PathBuf,
    cert_pem: String,
    key_pem: String,
}

fn pki(dir: &Path) -> Pki {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "webhook test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(params, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_pem).unwrap();
    Pki {
        ca_path,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A local HTTPS receiver on 127.0.0.1: answers 500 to the first `fail_first`
/// requests, 200 after; records every request. Stops when dropped.
struct Receiver {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Receiver {
    fn start(pki: &Pki, port: u16, fail_first: usize) -> Receiver {
        let chain: Vec<_> =
            rustls_pki_types::pem::PemObject::pem_slice_iter(pki.cert_pem.as_bytes())
                .map(Result::unwrap)
                .collect();
        let key = rustls_pki_types::pem::PemObject::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(AtomicUsize::new(0));
        let record = Arc::clone(&hits);
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let record = Arc::clone(&record);
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let record = Arc::clone(&record);
                            let seen = Arc::clone(&seen);
                            async move {
                                use http_body_util::BodyExt;
                                let target = req.uri().to_string();
                                let headers = req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                                    })
                                    .collect();
                                let body = req.into_body().collect().await?.to_bytes().to_vec();
                                let n = seen.fetch_add(1, Ordering::SeqCst);
                                let status = if n < fail_first { 500 } else { 200 };
                                record.lock().unwrap().push(Hit {
                                    target,
                                    headers,
                                    body,
                                    status,
                                });
                                let resp = hyper::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                        b"ok",
                                    )))
                                    .unwrap();
                                Ok::<_, hyper::Error>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            hits,
            runtime: Some(runtime),
        }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// The requests it accepted (answered 200), once `pred` holds for them (or 60 s).
    fn wait_accepted(&self, pred: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok: Vec<Hit> = self
                .hits()
                .into_iter()
                .filter(|h| h.status == 200)
                .collect();
            if pred(&ok) || Instant::now() > deadline {
                return ok;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn profile(port: u16, pki: &Pki, tenant_extra: &str) -> String {
    let tenant = format!(
        "events_url = \"https://127.0.0.1:{port}/hooks/sipbridge?token=q-5ecr3t\"\n\
         events_secret = \"env:TEST_EVENTS_SECRET\"\n\
         events_ca = \"file:{}\"\n{tenant_extra}",
        pki.ca_path.display()
    );
    ProfileSpec {
        tenant: &tenant,
        ..ProfileSpec::default()
    }
    .render()
    .replace(
        "[profile.sip]",
        "[profile.admin]\nlisten = \"127.0.0.1:0\"\n\n[profile.sip]",
    )
}

fn spawn(text: &str, tmp: &Path) -> Daemon {
    Daemon::spawn_with_env(
        text,
        &[
            ("TEST_EVENTS_SECRET", SECRET),
            ("TMPDIR", tmp.to_str().unwrap()),
        ],
    )
}

fn schema() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo_path("docs/events.schema.json")).unwrap())
        .unwrap()
}

/// Checks the hit's signature the way docs/webhooks.md tells receivers to: HMAC-SHA256
/// of `<t>.<body>` under the secret, hex, compared with `v1`; `t` within 5 minutes.
fn assert_signed(hit: &Hit) {
    let header = hit
        .headers
        .get("sipbridge-signature")
        .unwrap_or_else(|| panic!("no signature: {:?}", hit.headers));
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_owned()),
            Some(("v1", v)) => v1 = Some(v.to_owned()),
            _ => panic!("unexpected part {part} in {header}"),
        }
    }
    let (t, v1) = (t.unwrap(), v1.unwrap());
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(&hit.body);
    mac.verify_slice(&hex::decode(&v1).unwrap())
        .unwrap_or_else(|_| panic!("bad signature {header}"));
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t: u64 = t.parse().unwrap();
    assert!(now.abs_diff(t) <= 300, "t={t} now={now}");
    // A wrong key does not verify.
    let mut wrong = <Hmac<Sha256> as KeyInit>::new_from_slice(b"another secret, 16+").unwrap();
    wrong.update(format!("{t}.").as_bytes());
    wrong.update(&hit.body);
    assert!(wrong.verify_slice(&hex::decode(&v1).unwrap()).is_err());
}

fn assert_valid(hit: &Hit, schema: &serde_json::Value) {
    let v = hit.json();
    let errors = json_schema::violations(schema, &v);
    assert!(errors.is_empty(), "{v}\n{errors:#?}");
    assert_eq!(hit.headers["sipbridge-event-id"], v["id"].as_str().unwrap());
    assert_eq!(
        hit.headers["sipbridge-event-type"],
        v["type"].as_str().unwrap()
    );
    assert_eq!(hit.headers["content-type"], "application/json");
}

fn kinds(hits: &[Hit]) -> Vec<String> {
    hits.iter().map(Hit::kind).collect()
}

#[test]
fn a_recorded_call_sends_every_event_signed_in_order_and_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let receiver = Receiver::start(&pki, 0, 0);
    let text = profile(receiver.addr.port(), &pki, "")
        .replace("recording = false\n", "recording = true\n");
    let daemon = spawn(&text, tmp.path());
    let sc = sipp_scenario("call_with_audio.xml");
    sipp(&sc, daemon.udp_addr(), &["-s", NUMBER]).assert_success();
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("CDR");
    let call_id = cdr["call_id"].as_str().unwrap().to_owned();

    let hits = receiver.wait_accepted(|h| h.len() >= 4);
    assert_eq!(
        kinds(&hits),
        [
            "call.started",
            "call.answered",
            "call.ended",
            "recording.ready"
        ],
        "{hits:#?}"
    );
    let schema = schema();
    for h in &hits {
        assert_signed(h);
        assert_valid(h, &schema);
        let v = h.json();
        assert_eq!(v["tenant"], "demo");
        assert_eq!(v["call_id"], call_id.as_str());
        assert_eq!(h.headers["sipbridge-delivery-attempt"], "1");
    }
    let ids: std::collections::HashSet<_> = hits.iter().map(|h| h.json()["id"].clone()).collect();
    assert_eq!(ids.len(), 4, "event ids are unique");

    let started = hits[0].json();
    // Masked exactly as the CDR log masks it; the real number is in neither.
    assert_eq!(started["data"]["from"], cdr["from"]);
    assert_ne!(cdr["from"], "+15550001111");
    assert_eq!(started["data"]["to"], cdr["to"]);
    assert_eq!(started["data"]["recording"], true);
    assert_eq!(started["data"]["trunk"], "local");
    assert_eq!(hits[1].json()["data"]["codec"], "PCMU");
    let answered = hits[1].json()["data"]["answered_at"].as_i64().unwrap();
    assert!(
        (cdr["started_at"].as_i64().unwrap()..=cdr["ended_at"].as_i64().unwrap())
            .contains(&answered),
        "{answered} {cdr}"
    );
    // call.ended carries the CDR exactly as logged.
    assert_eq!(hits[2].json()["data"]["cdr"], cdr);

    let rec = hits[3].json()["data"].clone();
    let store = sipbridge::store::db::Store::open(&daemon.dir().join("var/sipbridge.db")).unwrap();
    let recs = store.recordings_of_call("demo", &call_id).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(rec["recording_id"], recs[0].id.as_str());
    assert_eq!(rec["state"], "complete");
    assert_eq!(rec["bytes"], recs[0].size_bytes);
    assert_eq!(rec["duration_ms"], recs[0].duration_ms);
    assert_eq!(
        rec["bytes"].as_u64().unwrap(),
        std::fs::metadata(&recs[0].path).unwrap().len()
    );
    // The secret is in no log line and no body.
    for line in daemon.logs() {
        assert!(!line.contains(SECRET), "secret logged: {line}");
        assert!(!line.contains("q-5ecr3t"), "the URL's query logged: {line}");
    }
    assert!(daemon.logs().iter().any(|l| l.contains("/hooks/sipbridge")));
    // The receiver got the URL as configured, query included.
    for h in &hits {
        assert_eq!(h.target, "/hooks/sipbridge?token=q-5ecr3t");
    }
    for h in &hits {
        assert!(!String::from_utf8_lossy(&h.body).contains(SECRET));
    }
    let text = http::get(daemon.admin_addr(), "/metrics", None).text();
    assert!(
        text.contains("sipbridge_webhook_deliveries_total{tenant=\"demo\",result=\"ok\"} 4"),
        "{text}"
    );
}

#[test]
fn a_receiver_that_is_down_does_not_hold_the_call_and_gets_the_events_later() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    // Nothing listens on the port while the call runs.
    let port = free_port();
    let daemon = spawn(&profile(port, &pki, ""), tmp.path());
    let sc = sipp_scenario("call_with_audio.xml");
    sipp(&sc, daemon.udp_addr(), &["-s", NUMBER]).assert_success();
    // The call completed as any other: answered, ended by the caller's BYE.
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("CDR");
    assert_eq!(cdr["cause"], "caller-bye", "{cdr}");
    assert!(cdr["answered_at"].as_i64().unwrap() >= cdr["started_at"].as_i64().unwrap());
    let metrics = http::get(daemon.admin_addr(), "/metrics", None).text();
    assert!(
        metrics.contains("sipbridge_webhook_deliveries_total{tenant=\"demo\",result=\"failed\"}"),
        "deliveries were tried while the call ran: {metrics}"
    );
    // The receiver comes up, and answers 500 twice before it accepts.
    let receiver = Receiver::start(&pki, port, 2);
    let hits = receiver.wait_accepted(|h| h.len() >= 3);
    assert_eq!(
        kinds(&hits),
        ["call.started", "call.answered", "call.ended"],
        "{:#?}",
        receiver.hits()
    );
    let all = receiver.hits();
    assert_eq!(all[0].status, 500);
    assert_eq!(
        all[0].kind(),
        "call.started",
        "the oldest event is retried first"
    );
    let schema = schema();
    for h in &hits {
        assert_signed(h);
        assert_valid(h, &schema);
    }
    // Retried: the same id on every attempt, and the attempt counted.
    assert_eq!(all[0].json()["id"], hits[0].json()["id"]);
    let attempt: u32 = hits[0].headers["sipbridge-delivery-attempt"]
        .parse()
        .unwrap();
    assert!(attempt >= 3, "attempt {attempt}");
    assert_eq!(hits[2].json()["data"]["cdr"], cdr);
}

#[test]
fn a_full_queue_drops_the_oldest_event_and_counts_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let port = free_port();
    let daemon = spawn(&profile(port, &pki, "events_queue = 1\n"), tmp.path());
    sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    )
    .assert_success();
    daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("CDR");
    let metrics = http::get(daemon.admin_addr(), "/metrics", None).text();
    let dropped: u64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("sipbridge_webhook_events_dropped_total")
                && l.contains("reason=\"queue_full\"")
                && l.contains("tenant=\"demo\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no drop counter: {metrics}"));
    assert!(dropped >= 1, "{dropped}");
    let receiver = Receiver::start(&pki, port, 0);
    let hits = receiver.wait_accepted(|h| h.iter().any(|h| h.kind() == "call.ended"));
    let got = kinds(&hits);
    // Three events, one queue slot (and the one being retried): the newest is kept,
    // what is missing was dropped and counted, the rest is in order.
    assert_eq!(
        got.last().map(String::as_str),
        Some("call.ended"),
        "{got:?}"
    );
    assert_eq!(got.len() as u64 + dropped, 3, "{got:?} dropped {dropped}");
    let order = ["call.started", "call.answered", "call.ended"];
    let positions: Vec<usize> = got
        .iter()
        .map(|k| order.iter().position(|o| o == k).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{got:?}");
}

/// examples/webhook_receiver.py (the receiver docs/webhooks.md points to) verifies
/// the daemon's signatures and prints each event once.
#[test]
fn the_example_receiver_verifies_the_daemons_events() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let mut child = std::process::Command::new("python3")
        .arg(repo_path("examples/webhook_receiver.py"))
        .args(["--port", "0", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .env("EVENTS_SECRET", SECRET)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let _child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let err_tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = err_tx.send(("stderr", line));
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(("stdout", line));
        }
    });
    let port: u16 = loop {
        let (_, line) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("receiver start");
        if let Some(addr) = line.strip_prefix("receiver: listening on 127.0.0.1:") {
            break addr.parse().unwrap();
        }
    };
    let daemon = spawn(&profile(port, &pki, ""), tmp.path());
    sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    )
    .assert_success();
    let mut events = Vec::new();
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let posts = |log: &[String]| log.iter().filter(|l| l.contains("\"POST ")).count();
    while (events.len() < 3 || posts(&log) < 3) && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(("stdout", line)) => {
                events.push(serde_json::from_str::<serde_json::Value>(&line).unwrap())
            }
            Ok((_, line)) => log.push(line),
            Err(_) => {}
        }
    }
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["call.started", "call.answered", "call.ended"],
        "{log:#?}"
    );
    // Every POST was accepted: none answered 401.
    assert!(log.iter().all(|l| !l.contains(" 401 ")), "{log:#?}");
    assert_eq!(
        log.iter().filter(|l| l.contains("\"POST ")).count(),
        3,
        "{log:#?}"
    );
}

/// A Deepgram tenant that stores transcripts gets `transcript.ready` once the call and
/// its stream's last results (sent after the call ended) are stored: after
/// `call.ended`, counting every segment.
#[test]
fn transcript_ready_follows_the_streams_last_results() {
    use common::deepgram_mock::{ConnScript, DeepgramMock, MockConfig, Scripted};
    const DG_KEY: &str = "dg-webhook-test-key";
    let mut config = MockConfig::new(DG_KEY);
    config.scripts = vec![ConnScript {
        at_audio: vec![
            (1.2, Scripted::final_result(0.30, 0.50, "hi", 0.97)),
            (
                2.2,
                Scripted::final_result(0.80, 1.20, "i would like to check", 0.91),
            ),
        ],
        on_close: vec![Scripted::final_result(2.00, 0.90, "my order status", 0.88)],
        drop_at_audio: None,
    }];
    let mock = DeepgramMock::start(config);
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let receiver = Receiver::start(&pki, 0, 0);
    let pipeline = format!(
        r#"pipeline = {{ kind = "deepgram", model = "nova-3", language = "en-US", api_key = "env:DG_KEY", base_url = "{}" }}"#,
        mock.base_url()
    );
    let text = profile(
        receiver.addr.port(),
        &pki,
        "caller_audio_after_prompt = false\n",
    )
    .replace(r#"pipeline = { kind = "echo" }"#, &pipeline)
    .replace("transcripts = false", "transcripts = true");
    let daemon =
        Daemon::spawn_with_env(&text, &[("TEST_EVENTS_SECRET", SECRET), ("DG_KEY", DG_KEY)]);
    sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    )
    .assert_success();
    let hits = receiver.wait_accepted(|h| h.iter().any(|h| h.kind() == "transcript.ready"));
    assert_eq!(
        kinds(&hits),
        [
            "call.started",
            "call.answered",
            "call.ended",
            "transcript.ready"
        ],
        "{hits:#?}"
    );
    let schema = schema();
    for h in &hits {
        assert_signed(h);
        assert_valid(h, &schema);
    }
    let ready = hits[3].json();
    assert_eq!(ready["data"]["segments"], 3, "{ready}");
    assert_eq!(ready["call_id"], hits[0].json()["call_id"]);
    // Never the text.
    assert!(!String::from_utf8_lossy(&hits[3].body).contains("order status"));
}

#[test]
fn transfers_send_transfer_started_completed_and_failed() {
    use common::SippServer;
    use common::test_agent::{Behaviour, TestAgent};
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let receiver = Receiver::start(&pki, 0, 0);
    // The target of the first call's bridge transfer answers; the second call's agent
    // asks for a transfer to something that is no target at all.
    let target_media = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = SippServer::spawn_with_media("bridge_target_uas.xml", &target_media);
    let agent = TestAgent::spawn(vec![
        Behaviour::SayAfterStart(r#"{"event":"transfer","to":"+15557654321","mode":"bridge"}"#),
        Behaviour::SayAfterStart(r#"{"event":"transfer","to":"mailto:desk@example.com"}"#),
    ]);
    let pipeline = format!(
        r#"pipeline = {{ kind = "agent", url = "ws://127.0.0.1:{}/agent" }}"#,
        agent.port()
    );
    let text = format!(
        "{}\n[[trunk]]\nname = \"people\"\nallow = [\"192.0.2.0/24\"]\ntenant = \"demo\"\n\n\
         [trunk.outbound]\nproxy = \"{}\"\n",
        profile(receiver.addr.port(), &pki, "transfer_trunk = \"people\"\n"),
        target.addr()
    )
    .replacen(r#"pipeline = { kind = "echo" }"#, &pipeline, 1);
    let daemon = spawn(&text, tmp.path());
    let sc = sipp_scenario("call_with_audio.xml");
    sipp(&sc, daemon.udp_addr(), &["-s", NUMBER]).assert_success();
    target.finish().assert_success();
    sipp(&sc, daemon.udp_addr(), &["-s", NUMBER]).assert_success();

    let transfers = |hits: &[Hit]| -> Vec<Hit> {
        hits.iter()
            .filter(|h| h.kind().starts_with("transfer."))
            .cloned()
            .collect()
    };
    let hits = receiver.wait_accepted(|h| transfers(h).len() >= 3);
    let hits = transfers(&hits);
    assert_eq!(
        kinds(&hits),
        ["transfer.started", "transfer.completed", "transfer.failed"],
        "{hits:#?}"
    );
    let schema = schema();
    for h in &hits {
        assert_signed(h);
        assert_valid(h, &schema);
    }
    let (started, completed, failed) = (hits[0].json(), hits[1].json(), hits[2].json());
    assert_eq!(started["data"]["mode"], "bridge");
    assert_eq!(started["data"]["to"], "tel:+15557654321");
    assert_eq!(completed["data"]["sip_status"], 200);
    assert_eq!(completed["call_id"], started["call_id"]);
    assert_eq!(failed["data"]["reason"], "invalid-target");
    assert_ne!(failed["call_id"], started["call_id"]);
}
