#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Configuration reload (issue 7, Build 3). Through the real daemon: with a SIPp call
//! in progress, the profile gains a tenant and a route and the live call's tenant
//! changes its pipeline; SIGHUP: the live call completes normally (SIPp 0 failed, CDR
//! `caller-bye`) without ever trying the new pipeline, the next call to the tenant
//! tries the new pipeline, and a number that was 404 is now answered by the new tenant.
//! An invalid profile on SIGHUP is rejected whole (diagnostics logged, RELOADING then
//! READY notified) and the old routes still work. Listeners: an unchanged address keeps
//! its socket, a new one is opened, a removed one closed.
//!
//! Sans-IO: `Switchboard::reconfigure` keeps live-call counts (limits still hold across
//! a reload) and what a call was admitted with, while new calls get the new routes,
//! tenants and prompts.

mod common;
mod lifecycle_support;

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::{Daemon, ProfileSpec, free_port, repo_path, sipp, sipp_scenario};
use lifecycle_support::{NotifySocket, log_field, log_message, signal, status_of, udp_request};
use rand::SeedableRng;
use rand::rngs::StdRng;
use sipbridge::call::{
    Dispatch, Peer, PortAllocator, Switchboard, SwitchboardSettings, TransportKind,
};
use sipbridge::media::resample::PipelineRate;
use sipbridge::sip::message::{Message, parse_datagram};

const WAIT: Duration = Duration::from_secs(10);
const OLD_NUMBER: &str = "+15551230000";
const NEW_NUMBER: &str = "+15559990000";

/// The test profile with the `local` trunk open to every tenant and `routes`.
fn profile(routes: &str, extra: &str) -> String {
    let text = ProfileSpec {
        media: "rtp_timeout_s = 60",
        routes: Some(routes),
        extra,
        ..ProfileSpec::default()
    }
    .render();
    let dedicated = "allow = [\"127.0.0.0/8\"]\ntenant = \"demo\"\n";
    assert!(text.contains(dedicated), "{text}");
    text.replace(dedicated, "allow = [\"127.0.0.0/8\"]\n")
}

fn route(number: &str, tenant: &str) -> String {
    format!("[[route]]\nnumber = \"{number}\"\ntenant = \"{tenant}\"\n")
}

fn logged(daemon: &Daemon, message: &str) -> Vec<String> {
    daemon
        .logs()
        .into_iter()
        .filter(|l| log_message(l).as_deref() == Some(message))
        .collect()
}

fn wait_logged(daemon: &Daemon, message: &str) -> String {
    daemon
        .wait_for_log(WAIT, |l| log_message(l).as_deref() == Some(message))
        .unwrap_or_else(|| panic!("no {message:?} log line"))
}

/// Replaces the daemon's profile file (the one `run --config` named) and sends SIGHUP.
fn reload_with(daemon: &Daemon, text: &str) {
    std::fs::write(daemon.dir().join("profile.toml"), text).unwrap();
    signal(daemon.pid(), "-HUP");
}

#[test]
fn live_call_keeps_its_settings_new_calls_follow_the_new_profile() {
    let old = profile(&route(OLD_NUMBER, "demo"), "");
    let daemon = Daemon::spawn(&old);
    let target = daemon.udp_addr();

    // Before: the new number has no route.
    let before = sipp(&sipp_scenario("no_route.xml"), target, &["-s", NEW_NUMBER]);
    before.assert_success();

    // A call in progress (3.5 s after the answer).
    let live = thread::spawn(move || {
        sipp(
            &sipp_scenario("call_with_audio.xml"),
            target,
            &["-s", OLD_NUMBER],
        )
    });
    let answered = wait_logged(&daemon, "answered");
    let live_call_id = call_id_of(&answered);

    // New profile: tenant `sales` and a route to it; `demo` now feeds an agent that
    // refuses connections (each call that tries it logs the failure with its call id).
    let closed = free_port();
    let new = profile(
        &format!(
            "{}{}",
            route(OLD_NUMBER, "demo"),
            route(NEW_NUMBER, "sales")
        ),
        "[[tenant]]\nid = \"sales\"\npipeline = { kind = \"echo\" }\n",
    )
    // `demo` is the first tenant in the file.
    .replacen(
        "pipeline = { kind = \"echo\" }",
        &format!("pipeline = {{ kind = \"agent\", url = \"ws://127.0.0.1:{closed}/agent\", on_failure = \"continue\" }}"),
        1,
    );
    assert!(new.contains("kind = \"agent\""), "{new}");
    reload_with(&daemon, &new);
    let reloaded = wait_logged(&daemon, "configuration reloaded");
    let summary = log_field(&reloaded, "summary").unwrap();
    assert!(
        summary.starts_with(
            "1 trunks, 2 tenants, 2 routes; listeners added: none; removed: none; kept: 2"
        ),
        "{summary}"
    );

    // The live call completes normally.
    let result = live.join().unwrap();
    result.assert_success();
    let cdr = daemon
        .wait_for_cdr(WAIT, |c| c["call_id"] == live_call_id.as_str())
        .expect("CDR of the live call");
    assert_eq!(cdr["result_code"], 200, "{cdr}");
    assert_eq!(cdr["cause"], "caller-bye", "{cdr}");

    // The next call to the new number is answered by `sales`.
    sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &["-s", NEW_NUMBER],
    )
    .assert_success();
    let sales = daemon
        .wait_for_cdr(WAIT, |c| c["to"] == NEW_NUMBER && c["result_code"] == 200)
        .expect("CDR of the call to the new route");
    assert_eq!(sales["tenant"], "sales", "{sales}");

    // The next call to `demo` tries the new pipeline; the live one never did.
    sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &["-s", OLD_NUMBER],
    )
    .assert_success();
    let next = daemon
        .wait_for_cdr(WAIT, |c| {
            c["to"] == OLD_NUMBER
                && c["result_code"] == 200
                && c["call_id"] != live_call_id.as_str()
        })
        .expect("CDR of the next demo call");
    let failed_agents = || {
        daemon
            .logs()
            .into_iter()
            .filter(|l| log_message(l).as_deref() == Some("agent pipeline failed"))
            .filter_map(|l| log_field(&l, "call_id"))
            // One line per connection attempt (the tenant's reconnects).
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + WAIT;
    while failed_agents().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(failed_agents(), [next["call_id"].as_str().unwrap()]);
}

/// The `call_id` span field of a call's log line.
fn call_id_of(line: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    value["spans"]
        .as_array()
        .and_then(|spans| spans.iter().find_map(|s| s["call_id"].as_str()))
        .unwrap_or_else(|| panic!("no call_id span in {line}"))
        .to_owned()
}

#[test]
fn invalid_profile_is_rejected_whole_and_old_routes_still_work() {
    let notify = NotifySocket::bind();
    let old = profile(&route(OLD_NUMBER, "demo"), "");
    let daemon = Daemon::spawn_with_env(&old, &[("NOTIFY_SOCKET", notify.path_str())]);
    notify
        .wait_for(0, WAIT, |m| m.contains("READY=1"))
        .expect("READY");
    let target = daemon.udp_addr();

    // Valid routes plus two errors: a route to a tenant that does not exist and an
    // unknown key. Nothing of it may be applied.
    let broken = profile(
        &format!(
            "{}{}",
            route(OLD_NUMBER, "demo"),
            route(NEW_NUMBER, "nobody")
        ),
        "",
    )
    .replace("max_calls = 50\n", "max_calls = 50\nmax_callz = 3\n");
    let from = notify.messages().len();
    reload_with(&daemon, &broken);
    let rejected = wait_logged(
        &daemon,
        "configuration reload rejected; the running configuration stays",
    );
    let error = log_field(&rejected, "error").unwrap();
    assert!(
        error.starts_with("configuration invalid (2 error(s)): "),
        "{error}"
    );
    let diagnostics: Vec<String> = logged(&daemon, "configuration invalid")
        .iter()
        .filter_map(|l| log_field(l, "diagnostic"))
        .collect();
    assert_eq!(diagnostics.len(), 2, "{diagnostics:?}");
    assert!(
        diagnostics.iter().any(|d| d.contains("max_callz")),
        "{diagnostics:?}"
    );
    assert!(
        diagnostics.iter().any(|d| d.contains("nobody")),
        "{diagnostics:?}"
    );
    assert!(
        diagnostics.iter().all(|d| d.contains("profile.toml:")),
        "diagnostics carry their file:line:column: {diagnostics:?}"
    );
    assert!(logged(&daemon, "configuration reloaded").is_empty());
    let reloading = notify
        .wait_for(from, WAIT, |m| {
            m.starts_with("RELOADING=1\nMONOTONIC_USEC=")
        })
        .expect("RELOADING");
    notify
        .wait_for(reloading + 1, WAIT, |m| m.starts_with("READY=1\n"))
        .expect("READY after a rejected reload");

    // The old configuration still serves: the old number answers, the new one is 404.
    sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &["-s", OLD_NUMBER],
    )
    .assert_success();
    sipp(&sipp_scenario("no_route.xml"), target, &["-s", NEW_NUMBER]).assert_success();

    // The same file, fixed, then applies.
    let fixed = profile(
        &format!("{}{}", route(OLD_NUMBER, "demo"), route(NEW_NUMBER, "demo")),
        "",
    );
    reload_with(&daemon, &fixed);
    wait_logged(&daemon, "configuration reloaded");
    sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &["-s", NEW_NUMBER],
    )
    .assert_success();
}

#[test]
fn reload_opens_new_listeners_keeps_unchanged_ones_and_closes_removed_ones() {
    let old = profile(&route(OLD_NUMBER, "demo"), "");
    let daemon = Daemon::spawn(&old);
    let (udp, tcp) = (daemon.udp_addr(), daemon.tcp_addr());
    assert_eq!(status_of(&udp_request(udp, "OPTIONS", OLD_NUMBER)), 200);
    assert!(TcpStream::connect(tcp).is_ok());

    // UDP 127.0.0.1:0 stays (the same socket, same port); a second UDP listener is
    // added; the TCP listener goes.
    let port = free_port();
    let new = old.replace(
        "udp = [\"127.0.0.1:0\"]\ntcp = [\"127.0.0.1:0\"]\n",
        &format!("udp = [\"127.0.0.1:0\", \"127.0.0.1:{port}\"]\n"),
    );
    assert_ne!(new, old);
    reload_with(&daemon, &new);
    let reloaded = wait_logged(&daemon, "configuration reloaded");
    let summary = log_field(&reloaded, "summary").unwrap();
    assert!(
        summary.ends_with(&format!(
            "listeners added: udp 127.0.0.1:{port}; removed: tcp {tcp}; kept: 1"
        )),
        "{summary}"
    );

    assert_eq!(status_of(&udp_request(udp, "OPTIONS", OLD_NUMBER)), 200);
    let added: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(status_of(&udp_request(added, "OPTIONS", OLD_NUMBER)), 200);
    assert!(
        TcpStream::connect(tcp).is_err(),
        "the removed TCP listener still accepts"
    );
    // A call on the new listener works end to end.
    sipp(&sipp_scenario("basic_call.xml"), added, &["-s", OLD_NUMBER]).assert_success();
}

// ---------------------------------------------------------------------------------------
// Sans-IO: Switchboard::reconfigure
// ---------------------------------------------------------------------------------------

fn config_text(tenants: &str, routes: &str) -> String {
    format!(
        r#"[profile]
name = "t"
var_dir = "var"
max_calls = 10
rtp_ports = {{ start = 40000, end = 40099 }}
[profile.listen]
udp = ["127.0.0.1:5060"]
[[trunk]]
name = "carrier"
allow = ["127.0.0.0/8"]
{tenants}
{routes}
"#
    )
}

fn load(text: &str) -> Arc<sipbridge::config::Config> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).unwrap();
    Arc::new(sipbridge::config::load(&path).unwrap_or_else(|d| panic!("{d}")))
}

fn invite(number: &str, n: u32) -> Vec<u8> {
    let body = "v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio 30000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    format!(
        "INVITE sip:{number}@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bKrc{n}\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15559870000@127.0.0.1>;tag=c{n}\r\n\
To: <sip:{number}@127.0.0.1>\r\n\
Call-ID: rc-{n}@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:caller@127.0.0.1:5080>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn offer(sb: &mut Switchboard, number: &str, n: u32, rng: &mut StdRng) -> Dispatch {
    let raw = invite(number, n);
    let peer = Peer {
        transport: TransportKind::Udp,
        addr: "127.0.0.1:5080".parse().unwrap(),
        flow: 0,
    };
    sb.dispatch(
        Instant::now(),
        SystemTime::now(),
        &raw,
        parse_datagram(&raw),
        peer,
        |_| false,
        rng,
    )
}

fn rejected_with(d: &Dispatch) -> Option<u16> {
    match d {
        Dispatch::Reply { transmit, .. } => match parse_datagram(&transmit.bytes) {
            Ok(Message::Response(r)) => Some(r.status),
            _ => None,
        },
        _ => None,
    }
}

#[test]
fn reconfigure_keeps_live_calls_and_limits_and_routes_new_calls_anew() {
    let mut rng = StdRng::seed_from_u64(7);
    let prompt_path = repo_path("sip-profiles/prompts/disclosure.wav");
    let old = load(&config_text(
        &format!(
            "[[tenant]]\nid = \"demo\"\nmax_calls = 1\nprompt = \"{}\"\npipeline = {{ kind = \"echo\" }}\n",
            prompt_path.display()
        ),
        &route("+1555123*", "demo"),
    ));
    let local: SocketAddr = "127.0.0.1:5060".parse().unwrap();
    let settings = SwitchboardSettings::from_profile(&old.profiles[0], Some(local), None);
    let mut sb = Switchboard::new(
        Arc::clone(&old),
        settings,
        PortAllocator::new(40000, 40099),
        &mut rng,
    );
    let prompt = Arc::new(sipbridge::media::prompt::Prompt::load(&prompt_path).unwrap());
    sb.set_prompts([("demo".to_owned(), Arc::clone(&prompt))].into());

    let Dispatch::NewCall(first) = offer(&mut sb, "+15551230001", 1, &mut rng) else {
        panic!("first call not admitted");
    };
    assert!(first.settings.plan.prompt.is_some());
    assert!(first.settings.plan.echo_delay.is_some());

    // New: `demo` has no prompt, talks 8 kHz to an agent; `sales` is new.
    let new = load(&config_text(
        "[[tenant]]\nid = \"demo\"\nmax_calls = 1\npipeline_rate = 8000\n\
         pipeline = { kind = \"agent\", url = \"ws://127.0.0.1:9/a\" }\n\
         [[tenant]]\nid = \"sales\"\npipeline = { kind = \"echo\" }\n",
        &format!(
            "{}{}",
            route("+1555123*", "demo"),
            route("+1555999*", "sales")
        ),
    ));
    let settings = SwitchboardSettings::from_profile(&new.profiles[0], Some(local), None);
    sb.reconfigure(Arc::clone(&new), settings, Default::default(), &mut rng);
    assert!(Arc::ptr_eq(sb.config(), &new));
    assert_eq!(sb.active_calls(), 1, "the live call still counts");

    // The tenant limit still sees the live call.
    assert_eq!(
        rejected_with(&offer(&mut sb, "+15551230002", 2, &mut rng)),
        Some(486)
    );
    // The new route is live.
    let Dispatch::NewCall(sales) = offer(&mut sb, "+15559990000", 3, &mut rng) else {
        panic!("call to the new route not admitted");
    };
    assert_eq!(sales.settings.tenant, "sales");

    // The first call's settings are what it was admitted with; when it ends, its slot
    // and port are freed, and the next demo call gets the new tenant settings.
    assert!(first.settings.plan.prompt.is_some());
    assert_eq!(first.settings.plan.pipeline_rate, PipelineRate::Hz16000);
    sb.call_ended(&first.settings);
    let Dispatch::NewCall(next) = offer(&mut sb, "+15551230003", 4, &mut rng) else {
        panic!("next demo call not admitted");
    };
    assert_eq!(next.settings.tenant, "demo");
    assert!(next.settings.plan.prompt.is_none());
    assert_eq!(next.settings.plan.pipeline_rate, PipelineRate::Hz8000);
    assert!(next.settings.plan.echo_delay.is_none(), "agent, not echo");
    assert_eq!(sb.active_calls(), 2);
}

/// The calls' media threads (`sb-media-N`), by name, in the daemon's `/proc` entry.
fn media_threads(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .filter(|n| n.starts_with("sb-media-") && !n.ends_with("-blk"))
        .collect();
    names.sort();
    names
}

/// `[profile.media] threads` starts that many media threads, which run the calls; the
/// number is fixed at start: a reload that changes it is refused whole (a restart is
/// needed), and calls go on being answered.
#[test]
fn media_threads_run_the_calls_and_changing_them_needs_a_restart() {
    let text = profile(&route(OLD_NUMBER, "demo"), "")
        .replace("rtp_timeout_s = 60", "rtp_timeout_s = 60\nthreads = 2");
    assert!(text.contains("threads = 2"), "{text}");
    let daemon = Daemon::spawn(&text);
    let started = wait_logged(&daemon, "media threads started");
    assert_eq!(log_field(&started, "threads").as_deref(), Some("2"));
    assert_eq!(media_threads(daemon.pid()), ["sb-media-0", "sb-media-1"]);
    let target = daemon.udp_addr();
    sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &["-s", OLD_NUMBER],
    )
    .assert_success();

    reload_with(&daemon, &text.replace("threads = 2", "threads = 3"));
    let rejected = wait_logged(
        &daemon,
        "configuration reload rejected; the running configuration stays",
    );
    assert_eq!(
        log_field(&rejected, "error").as_deref(),
        Some("[profile.media] threads changed from 2 to 3: restart the daemon to change it")
    );
    assert_eq!(media_threads(daemon.pid()), ["sb-media-0", "sb-media-1"]);
    sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &["-s", OLD_NUMBER],
    )
    .assert_success();
}
