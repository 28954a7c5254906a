#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The lookups the daemon makes per call: trunk by source address, route by
//! dialed number, tenant by id; plus what `load` resolves.

use std::net::IpAddr;
use std::path::Path;

use sipbridge::config::{
    self, AgentMode, Config, MasterKey, NumberPattern, Pipeline, Retention, UnknownSource,
};

fn write_wav(path: &Path) {
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 16000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for _ in 0..(16000 * 2) {
        w.write_sample(0i16).unwrap();
    }
    w.finalize().unwrap();
}

const CONFIG: &str = r##"
[profile]
name = "lookup"
var_dir = "VAR"
master_key = "file:VAR/master.key"
max_calls = 40
rtp_ports = { start = 30000, end = 30079 }
advertised_address = "198.51.100.7"

[profile.listen]
udp = ["127.0.0.1:5070", "[::1]:5070"]
tcp = ["127.0.0.1:5070"]

[profile.sip]
t1_ms = 250
t2_ms = 2000
session_expires_s = 600
min_se_s = 120
unknown_source = "drop"

[[trunk]]
name = "carrier"
allow = ["10.0.0.0/8"]
max_calls = 30

[[trunk]]
name = "carrier-edge"
allow = ["10.1.0.0/16", "2001:db8::/32"]
max_calls = 10

[[trunk]]
name = "acme-pbx"
allow = ["10.1.2.3"]
tenant = "acme"
max_calls = 5

[[tenant]]
id = "demo"
pipeline = { kind = "echo" }

[[tenant]]
id = "acme"
recording = true
transcripts = true
prompt = "PROMPT"
opt_out_key = "#"
retention = { recordings_days = 30 }
pipeline = { kind = "deepgram+agent", model = "nova-3", language = "en-US", api_key = "env:DG", url = "wss://a.example/ws", mode = "twilio" }

[[route]]
number = "*"
tenant = "demo"

[[route]]
number = "+1555*"
tenant = "acme"

[[route]]
number = "+15551*"
tenant = "demo"
trunks = ["carrier"]

[[route]]
number = "+15551230000"
tenant = "acme"
"##;

fn load(dir: &Path) -> Config {
    write_wav(&dir.join("p.wav"));
    let var = dir.join("var");
    let text = CONFIG
        .replace("VAR", var.to_str().unwrap())
        .replace("PROMPT", dir.join("p.wav").to_str().unwrap());
    let file = dir.join("lookup.toml");
    std::fs::write(&file, text).unwrap();
    let env = |k: &str| (k == "DG").then(|| "dg-key".to_owned());
    config::load_with_env(&file, &env).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn most_specific_cidr_wins() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(dir.path());
    let name = |s: &str| cfg.trunk_for_source(ip(s)).map(|t| t.name.as_str());
    assert_eq!(name("10.9.9.9"), Some("carrier"));
    assert_eq!(name("10.1.9.9"), Some("carrier-edge"));
    assert_eq!(name("10.1.2.3"), Some("acme-pbx"));
    assert_eq!(name("::ffff:10.1.2.3"), Some("acme-pbx"));
    assert_eq!(name("2001:db8::1"), Some("carrier-edge"));
    assert_eq!(name("192.0.2.1"), None);
    assert_eq!(name("2001:db9::1"), None);
}

#[test]
fn exact_beats_prefix_and_longest_prefix_wins() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(dir.path());
    let route = |n: &str, t: &str| {
        cfg.route(n, t)
            .map(|r| (r.number.to_string(), r.tenant.clone()))
    };
    let pair = |n: &str, t: &str| Some((n.to_owned(), t.to_owned()));
    // Exact number, written with separators and without '+'.
    assert_eq!(
        route("1 (555) 123-0000", "carrier"),
        pair("+15551230000", "acme")
    );
    // +15551* (restricted to `carrier`) is longer than +1555*.
    assert_eq!(route("+15551999999", "carrier"), pair("+15551*", "demo"));
    // The same number from another trunk skips the restricted route.
    assert_eq!(
        route("+15551999999", "carrier-edge"),
        pair("+1555*", "acme")
    );
    assert_eq!(route("+4930123", "carrier"), pair("*", "demo"));
    // Not a number at all: no route.
    assert_eq!(route("*21#", "carrier"), None);
}

#[test]
fn a_dedicated_trunk_reaches_only_its_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(dir.path());
    let tenant = |n: &str| cfg.route(n, "acme-pbx").map(|r| r.tenant.as_str());
    assert_eq!(tenant("+15551230000"), Some("acme"));
    assert_eq!(tenant("+15559999999"), Some("acme"));
    // Only the catch-all (demo) would match: not for acme's own trunk.
    assert_eq!(tenant("+4930123"), None);
}

#[test]
fn load_resolves_every_setting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(dir.path());
    let p = &cfg.profiles[0];
    assert_eq!(p.name, "lookup");
    assert_eq!(
        p.listen.udp,
        vec![
            "127.0.0.1:5070".parse().unwrap(),
            "[::1]:5070".parse().unwrap()
        ]
    );
    assert_eq!(p.advertised_address, Some(ip("198.51.100.7")));
    assert_eq!(
        (p.rtp_ports.start, p.rtp_ports.end, p.rtp_ports.calls()),
        (30000, 30079, 40)
    );
    assert_eq!(p.sip.t1.as_millis(), 250);
    assert_eq!(p.sip.t4.as_millis(), 5000);
    assert_eq!(p.sip.min_se.as_secs(), 120);
    assert_eq!(p.sip.unknown_source, UnknownSource::Drop);
    assert!(
        matches!(&p.master_key, MasterKey::ToGenerate(path) if path == &dir.path().join("var/master.key"))
    );
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.message.contains("will be generated on first start"))
    );

    let acme = cfg.tenant("acme").unwrap();
    assert_eq!(acme.opt_out_key, Some('#'));
    let r = acme.retention;
    assert_eq!(
        (r.recordings_days, r.transcripts_days, r.metadata_days),
        (30, 90, 365)
    );
    assert_eq!(Retention::default().recordings_days, 90);
    let prompt = acme.prompt.as_ref().unwrap();
    assert_eq!(
        (prompt.sample_rate, prompt.channels, prompt.duration_ms),
        (16000, 2, 1000)
    );
    let Pipeline::DeepgramAgent(dg, agent) = &acme.pipeline else {
        panic!("wrong pipeline {:?}", acme.pipeline);
    };
    assert_eq!(dg.api_key.expose(), b"dg-key");
    assert_eq!(agent.mode, AgentMode::Twilio);
    assert!(agent.auth.is_none());
    assert!(matches!(
        cfg.tenant("demo").unwrap().pipeline,
        Pipeline::Echo
    ));
    assert!(cfg.tenant("nobody").is_none());
    assert_eq!(cfg.routes[1].number, NumberPattern::Prefix("1555".into()));

    let summary = cfg.summary();
    assert!(
        summary
            .contains("  acme: recording on, transcripts on, opt-out key #, max calls: unlimited")
    );
    assert!(summary.contains("(16000 Hz, stereo, 1.0 s)"));
    assert!(summary.contains("api_key env:DG (sha256:"));
    assert!(summary.contains("+15551* -> demo (trunks carrier)"));
}

#[test]
fn rtp_range_must_cover_the_call_limits() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("p.wav"));
    // 40 ports = 20 calls; the trunks allow 45 in total and the profile 40.
    let text = CONFIG
        .replace("VAR", dir.path().join("var").to_str().unwrap())
        .replace("PROMPT", dir.path().join("p.wav").to_str().unwrap())
        .replace("end = 30079", "end = 30039");
    let file = dir.path().join("x.toml");
    std::fs::write(&file, &text).unwrap();
    let env = |k: &str| (k == "DG").then(|| "dg-key".to_owned());
    let err = config::load_with_env(&file, &env).unwrap_err();
    let msgs: Vec<String> = err.errors().map(ToString::to_string).collect();
    assert_eq!(msgs.len(), 1, "{err}");
    assert!(
        msgs[0].ends_with("rtp_ports 30000-30039 hold 20 calls at 2 ports each, but up to 40 calls are allowed (max_calls); widen the range or lower the limits"),
        "{}",
        msgs[0]
    );
    // When the trunks' limits add up to fewer calls, those decide.
    let text = text.replace("max_calls = 30", "max_calls = 5");
    std::fs::write(&file, &text).unwrap();
    assert!(config::load_with_env(&file, &env).is_ok());
}

#[test]
fn audit_days_default_400_and_never_shorter_than_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(dir.path());
    let acme = cfg.tenants.iter().find(|t| t.id == "acme").unwrap();
    assert_eq!(acme.retention.audit_days, 400);

    write_wav(&dir.path().join("p.wav"));
    let base = CONFIG
        .replace("VAR", dir.path().join("var").to_str().unwrap())
        .replace("PROMPT", dir.path().join("p.wav").to_str().unwrap());
    let env = |k: &str| (k == "DG").then(|| "dg-key".to_owned());
    let file = dir.path().join("a.toml");
    // Data kept 500 days: the audit default grows with it.
    std::fs::write(
        &file,
        base.replace("recordings_days = 30", "recordings_days = 500"),
    )
    .unwrap();
    let cfg = config::load_with_env(&file, &env).unwrap();
    let acme = cfg.tenants.iter().find(|t| t.id == "acme").unwrap();
    assert_eq!(acme.retention.audit_days, 500);
    // Written shorter than the data: an error.
    std::fs::write(
        &file,
        base.replace(
            "recordings_days = 30",
            "recordings_days = 30, audit_days = 100",
        ),
    )
    .unwrap();
    let err = config::load_with_env(&file, &env).unwrap_err();
    assert!(
        err.to_string()
            .contains("audit_days 100 is shorter than the longest data retention (365 days)"),
        "{err}"
    );
}

#[test]
fn twilio_api_accounts_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("p.wav"));
    let base = CONFIG
        .replace("VAR", dir.path().join("var").to_str().unwrap())
        .replace("PROMPT", dir.path().join("p.wav").to_str().unwrap());
    let file = dir.path().join("tw.toml");
    let env = |k: &str| match k {
        "DG" => Some("dg-key".to_owned()),
        "TW" => Some("a-long-enough-auth-token".to_owned()),
        "SHORT" => Some("short".to_owned()),
        _ => None,
    };
    let with = |demo: &str, acme: &str| {
        base.replacen(
            "id = \"demo\"\npipeline = { kind = \"echo\" }\n",
            &format!("id = \"demo\"\npipeline = {{ kind = \"echo\" }}\n{demo}"),
            1,
        )
        .replacen(
            "mode = \"twilio\" }\n",
            &format!("mode = \"twilio\" }}\n{acme}"),
            1,
        )
    };
    let api = |sid: &str, token: &str| {
        format!("[tenant.twilio_api]\naccount_sid = \"{sid}\"\nauth_token = \"{token}\"\n")
    };
    // A good account loads, its token stays a secret.
    std::fs::write(
        &file,
        with("", &api("AC0123456789abcdef0123456789abcdef", "env:TW")),
    )
    .unwrap();
    let config = config::load_with_env(&file, &env).unwrap();
    let acme = config.tenant("acme").unwrap();
    let tw = acme.twilio_api.as_ref().unwrap();
    assert_eq!(tw.account_sid, "AC0123456789abcdef0123456789abcdef");
    assert_eq!(tw.auth_token.expose(), b"a-long-enough-auth-token");
    assert!(!format!("{tw:?}").contains("a-long-enough"));
    assert!(config.tenant("demo").unwrap().twilio_api.is_none());
    // Bad SID, short token, unset token, and one SID for two tenants: each reported.
    for (demo, acme, want) in [
        (
            "",
            api("AC/../x", "env:TW"),
            "must be 2-64 letters and digits",
        ),
        (
            "",
            api("ACshort0token", "env:SHORT"),
            "auth_token must be at least 16 bytes",
        ),
        ("", api("ACunset", "env:NOPE"), "twilio_api auth_token: "),
        (
            &*api("ACsame", "env:TW"),
            api("ACsame", "env:TW"),
            "duplicate twilio_api account_sid `ACsame`",
        ),
    ] {
        std::fs::write(&file, with(demo, &acme)).unwrap();
        let err = config::load_with_env(&file, &env).unwrap_err();
        let msgs: Vec<String> = err.errors().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 1, "{err}");
        assert!(msgs[0].contains(want), "{want}: {}", msgs[0]);
    }
}

/// `stats_interval_s`: off by default, 1–3600 s, anything else reported.
#[test]
fn stats_interval_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("p.wav"));
    let base = CONFIG
        .replace("VAR", dir.path().join("var").to_str().unwrap())
        .replace("PROMPT", dir.path().join("p.wav").to_str().unwrap());
    let file = dir.path().join("stats.toml");
    let env = |k: &str| (k == "DG").then(|| "dg-key".to_owned());
    let with = |line: &str| {
        base.replacen(
            "id = \"demo\"\npipeline = { kind = \"echo\" }\n",
            &format!("id = \"demo\"\npipeline = {{ kind = \"echo\" }}\n{line}\n"),
            1,
        )
    };
    std::fs::write(&file, with("")).unwrap();
    let config = config::load_with_env(&file, &env).unwrap();
    assert_eq!(config.tenant("demo").unwrap().stats_interval, None);
    std::fs::write(&file, with("stats_interval_s = 5")).unwrap();
    let config = config::load_with_env(&file, &env).unwrap();
    assert_eq!(
        config.tenant("demo").unwrap().stats_interval,
        Some(std::time::Duration::from_secs(5))
    );
    for (line, want) in [
        (
            "stats_interval_s = 0",
            "stats_interval_s must be at least 1",
        ),
        (
            "stats_interval_s = 3601",
            "stats_interval_s 3601 must be at most 3600",
        ),
    ] {
        std::fs::write(&file, with(line)).unwrap();
        let err = config::load_with_env(&file, &env).unwrap_err();
        let msgs: Vec<String> = err.errors().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 1, "{err}");
        assert!(msgs[0].contains(want), "{want}: {}", msgs[0]);
    }
}
