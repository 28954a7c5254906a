#![allow(clippy::unwrap_used, clippy::expect_used)]
//! SIP over TLS and SRTP against the real `sipbridge run` on loopback.
//!
//! - SIPp over TLS: this machine's SIPp is built without OpenSSL (`-t l1` exits with "you
//!   must compile SIPp with OpenSSL"), so SIPp speaks TCP (`-t t1`) to a TLS tunnel in
//!   this test ([`TlsTunnel`], tokio-rustls, verifying the daemon's certificate against
//!   the test CA), which carries each connection to the daemon's `listen.tls` socket.
//! - A TLS client of our own (rustls) for what needs exact bytes: the SRTP policy
//!   (`media_encryption` required/optional: status and SDP of the answer), the
//!   certificate swap on SIGHUP with a connection kept, and mutual TLS.
//!
//! Owns: the test CA and certificates (rcgen), the tunnel, the raw SIP requests.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Daemon, ProfileSpec, sipp, sipp_scenario};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

/// A CA, and PEM files of a leaf it signed, in `dir`.
struct Pki {
    ca_pem: String,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
}

fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pem = cert.pem();
    (Issuer::new(params, key), pem)
}

/// A leaf for 127.0.0.1 (IP SAN) and `localhost`, signed by `issuer`.
fn leaf(issuer: &Issuer<'static, KeyPair>, cn: &str) -> (String, String) {
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki(dir: &Path, tag: &str) -> Pki {
    let (issuer, ca_pem) = ca(&format!("test ca {tag}"));
    let (cert_pem, key_pem) = leaf(&issuer, &format!("sipbridge {tag}"));
    let cert = dir.join(format!("{tag}-cert.pem"));
    let key = dir.join(format!("{tag}-key.pem"));
    let ca = dir.join(format!("{tag}-ca.pem"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    std::fs::write(&ca, &ca_pem).unwrap();
    Pki {
        ca_pem,
        cert,
        key,
        ca,
    }
}

fn tls_table(p: &Pki) -> String {
    format!(
        "[profile.tls]\ncert = \"file:{}\"\nkey = \"file:{}\"\n",
        p.cert.display(),
        p.key.display()
    )
}

/// The daemon's bound TLS listener, from its `sip listener bound` log line.
fn tls_addr(daemon: &Daemon) -> SocketAddr {
    let line = daemon
        .wait_for_log(Duration::from_secs(5), |l| {
            l.contains("sip listener bound") && l.contains("\"transport\":\"tls\"")
        })
        .expect("tls listener bound");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let f = v.get("fields").unwrap_or(&v);
    f["local"].as_str().unwrap().parse().unwrap()
}

fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = rustls_pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                .map(Result::unwrap)
                .collect();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
    };
    Arc::new(config)
}

// ---------------------------------------------------------------------------------------
// A blocking TLS client
// ---------------------------------------------------------------------------------------

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    // Drive the handshake.
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// Reads SIP messages from a stream (Content-Length framing) until `want` says stop.
fn read_messages(tls: &mut impl Read, mut want: impl FnMut(&str) -> bool) -> Vec<String> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.eq_ignore_ascii_case("content-length") || k == "l")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() < end + 4 + len {
                break;
            }
            let msg = String::from_utf8_lossy(&buf[..end + 4 + len]).to_string();
            buf.drain(..end + 4 + len);
            let stop = !want(&msg);
            out.push(msg);
            if stop {
                return out;
            }
        }
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => return out,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn options(local: SocketAddr, transport: &str, n: u32) -> String {
    format!(
        "OPTIONS sip:+15551230000@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {local};branch=z9hG4bKopt{n}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@127.0.0.1>;tag=o{n}\r\n\
         To: <sip:+15551230000@127.0.0.1>\r\n\
         Call-ID: options-{n}@test\r\n\
         CSeq: {n} OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

const PLAIN_SDP: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
const SDES_SDP: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio 40000 RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n\
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n";

fn invite(local: SocketAddr, transport: &str, scheme: &str, n: u32, sdp: &str) -> String {
    let t = transport.to_ascii_lowercase();
    format!(
        "INVITE {scheme}:+15551230000@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {local};branch=z9hG4bKinv{n}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:+15550001111@127.0.0.1>;tag=i{n}\r\n\
         To: <sip:+15551230000@127.0.0.1>\r\n\
         Call-ID: invite-{n}@test\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:+15550001111@{local};transport={t}>\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
}

fn final_of(messages: &[String]) -> &str {
    messages
        .iter()
        .rev()
        .find(|m| m.starts_with("SIP/2.0 ") && !m.starts_with("SIP/2.0 1"))
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no final response in {messages:#?}"))
}

/// Sends an INVITE over TLS and returns its final response.
fn invite_over_tls(addr: SocketAddr, ca_pem: &str, scheme: &str, n: u32, sdp: &str) -> String {
    let mut tls = connect(addr, client_config(ca_pem, None)).unwrap();
    let local = tls.sock.local_addr().unwrap();
    tls.write_all(invite(local, "TLS", scheme, n, sdp).as_bytes())
        .unwrap();
    let msgs = read_messages(&mut tls, |m| {
        !m.starts_with("SIP/2.0 ") || m.starts_with("SIP/2.0 1")
    });
    final_of(&msgs).to_owned()
}

fn status(msg: &str) -> u16 {
    msg[8..11].parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// The TLS tunnel SIPp speaks TCP into
// ---------------------------------------------------------------------------------------

/// Accepts TCP on a loopback port and carries each connection over TLS to `target`.
struct TlsTunnel {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl TlsTunnel {
    fn start(target: SocketAddr, config: Arc<rustls::ClientConfig>) -> TlsTunnel {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(config);
            while let Ok((mut plain, _)) = listener.accept().await {
                let connector = connector.clone();
                tokio::spawn(async move {
                    let tcp = tokio::net::TcpStream::connect(target).await.unwrap();
                    let name = rustls_pki_types::ServerName::IpAddress(target.ip().into());
                    let mut tls = connector.connect(name, tcp).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut plain, &mut tls).await;
                });
            }
        });
        TlsTunnel {
            addr,
            _runtime: runtime,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

fn daemon_with_tls(dir: &Path, trunk: &str, extra: &str) -> (Daemon, Pki) {
    let p = pki(dir, "a");
    let tls = format!("{}{extra}", tls_table(&p));
    let toml = ProfileSpec {
        listen: "tls = [\"127.0.0.1:0\"]",
        trunk,
        extra: &tls,
        ..ProfileSpec::default()
    }
    .render();
    (Daemon::spawn(&toml), p)
}

#[test]
fn sipp_over_tls_places_50_calls_with_none_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, p) = daemon_with_tls(dir.path(), "", "");
    let tunnel = TlsTunnel::start(tls_addr(&daemon), client_config(&p.ca_pem, None));
    let result = sipp(
        &sipp_scenario("basic_call.xml"),
        tunnel.addr,
        &[
            "-t",
            "t1",
            "-s",
            "+15551230000",
            "-m",
            "50",
            "-r",
            "10",
            "-l",
            "10",
            "-timeout",
            "60s",
        ],
    );
    result.assert_success();
    assert_eq!(result.successful_calls, Some(50), "{}", result.report());
    assert_eq!(result.failed_calls, Some(0));
    // The daemon saw TLS: its Contact keeps the dialog on TLS, its Via says TLS.
    assert!(
        result.messages.contains("transport=tls"),
        "{}",
        result.report()
    );
    let cdrs = daemon.wait_for_cdrs(50, Duration::from_secs(10));
    assert_eq!(
        cdrs.iter().filter(|c| c["result_code"] == 200).count(),
        50,
        "{cdrs:?}"
    );
}

#[test]
fn sips_request_uri_gets_a_sips_contact() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, p) = daemon_with_tls(dir.path(), "", "");
    let ok = invite_over_tls(tls_addr(&daemon), &p.ca_pem, "sips", 1, PLAIN_SDP);
    assert_eq!(status(&ok), 200, "{ok}");
    let contact = ok.lines().find(|l| l.starts_with("Contact:")).unwrap();
    assert!(contact.contains("<sips:sipbridge@127.0.0.1:"), "{contact}");
    let ok = invite_over_tls(tls_addr(&daemon), &p.ca_pem, "sip", 2, PLAIN_SDP);
    let contact = ok.lines().find(|l| l.starts_with("Contact:")).unwrap();
    assert!(contact.contains(";transport=tls"), "{contact}");
}

#[test]
fn required_trunk_answers_a_plain_offer_488_and_an_sdes_offer_with_srtp() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, p) = daemon_with_tls(dir.path(), "media_encryption = \"required\"", "");
    let addr = tls_addr(&daemon);
    let plain = invite_over_tls(addr, &p.ca_pem, "sip", 1, PLAIN_SDP);
    assert_eq!(status(&plain), 488, "{plain}");
    let srtp = invite_over_tls(addr, &p.ca_pem, "sip", 2, SDES_SDP);
    assert_eq!(status(&srtp), 200, "{srtp}");
    assert!(srtp.contains("RTP/SAVP 0"), "{srtp}");
    let crypto = srtp
        .lines()
        .find(|l| l.starts_with("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:"))
        .unwrap();
    // Our own key, not the offerer's echoed back.
    assert!(!crypto.contains("WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"));
    // The key never reaches the log.
    let key = crypto.rsplit("inline:").next().unwrap().trim();
    assert!(daemon.logs().iter().all(|l| !l.contains(key)));
}

#[test]
fn optional_trunk_takes_plain_and_srtp_offers() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, p) = daemon_with_tls(dir.path(), "media_encryption = \"optional\"", "");
    let addr = tls_addr(&daemon);
    let plain = invite_over_tls(addr, &p.ca_pem, "sip", 1, PLAIN_SDP);
    assert_eq!(status(&plain), 200, "{plain}");
    assert!(
        plain.contains("RTP/AVP 0") && !plain.contains("a=crypto"),
        "{plain}"
    );
    let srtp = invite_over_tls(addr, &p.ca_pem, "sip", 2, SDES_SDP);
    assert_eq!(status(&srtp), 200, "{srtp}");
    assert!(
        srtp.contains("RTP/SAVP 0") && srtp.contains("a=crypto:1 "),
        "{srtp}"
    );
}

#[test]
fn sdes_over_plain_udp_is_refused_even_on_an_srtp_trunk() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _p) = daemon_with_tls(dir.path(), "media_encryption = \"optional\"", "");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = sock.local_addr().unwrap();
    sock.send_to(
        invite(local, "UDP", "sip", 1, SDES_SDP).as_bytes(),
        daemon.udp_addr(),
    )
    .unwrap();
    let mut buf = [0u8; 65536];
    loop {
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        if msg.starts_with("SIP/2.0 1") {
            continue;
        }
        assert_eq!(status(&msg), 488, "{msg}");
        assert!(!msg.contains("a=crypto"), "{msg}");
        break;
    }
}

#[test]
fn sighup_swaps_the_certificate_and_keeps_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, a) = daemon_with_tls(dir.path(), "", "");
    let addr = tls_addr(&daemon);
    let mut kept = connect(addr, client_config(&a.ca_pem, None)).unwrap();
    let local = kept.sock.local_addr().unwrap();
    kept.write_all(options(local, "TLS", 1).as_bytes()).unwrap();
    let first = read_messages(&mut kept, |_| false);
    assert_eq!(status(&first[0]), 200, "{first:?}");

    // New certificate from another CA: rewrite the profile's files, SIGHUP.
    let b = pki(dir.path(), "b");
    std::fs::copy(&b.cert, &a.cert).unwrap();
    std::fs::copy(&b.key, &a.key).unwrap();
    let pid = daemon.pid().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    daemon
        .wait_for_log(Duration::from_secs(10), |l| {
            l.contains("configuration reloaded")
        })
        .expect("reloaded");

    // The open connection still works.
    kept.write_all(options(local, "TLS", 2).as_bytes()).unwrap();
    let second = read_messages(&mut kept, |_| false);
    assert_eq!(status(&second[0]), 200, "{second:?}");
    // New handshakes get the new certificate: the old CA no longer verifies it.
    assert!(connect(addr, client_config(&a.ca_pem, None)).is_err());
    let mut fresh = connect(addr, client_config(&b.ca_pem, None)).unwrap();
    let local = fresh.sock.local_addr().unwrap();
    fresh
        .write_all(options(local, "TLS", 3).as_bytes())
        .unwrap();
    assert_eq!(status(&read_messages(&mut fresh, |_| false)[0]), 200);
}

#[test]
fn mutual_tls_trunk_needs_a_certificate_from_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (client_ca, client_ca_pem) = ca("carrier ca");
    std::fs::write(dir.path().join("carrier-ca.pem"), &client_ca_pem).unwrap();
    let (cert, key) = leaf(&client_ca, "carrier sbc");
    let (other_ca, _) = ca("someone else");
    let (bad_cert, bad_key) = leaf(&other_ca, "intruder");
    let trunk = format!(
        "tls_client_ca = \"file:{}\"",
        dir.path().join("carrier-ca.pem").display()
    );
    let (daemon, p) = daemon_with_tls(dir.path(), &trunk, "");
    let addr = tls_addr(&daemon);

    let try_options = |identity: Option<(&str, &str)>, n: u32| -> Vec<String> {
        let Ok(mut tls) = connect(addr, client_config(&p.ca_pem, identity)) else {
            return Vec::new();
        };
        let local = tls.sock.local_addr().unwrap();
        if tls.write_all(options(local, "TLS", n).as_bytes()).is_err() {
            return Vec::new();
        }
        read_messages(&mut tls, |_| false)
    };
    // No certificate: closed before any SIP is answered.
    assert!(try_options(None, 1).is_empty());
    // A certificate of another CA: refused in the handshake.
    assert!(try_options(Some((&bad_cert, &bad_key)), 2).is_empty());
    // The carrier's certificate: answered.
    let ok = try_options(Some((&cert, &key)), 3);
    assert_eq!(status(&ok[0]), 200, "{ok:?}");
    let _ = p.ca;
}
