//! Reading profile files and turning the raw TOML into a checked [`Config`].
//!
//! Owns: every check that needs a location (syntax, unknown keys, types,
//! addresses, CIDRs, numbers, secrets, prompt files, cross-references,
//! duplicates). All problems are collected; nothing stops at the first one.
//! Must not write files or open sockets.
//!
//! Each top-level item (`[profile]`, every `[[trunk]]`, `[[tenant]]`,
//! `[[route]]`) is deserialized on its own from toml's spanned document, so a
//! bad key in one item does not hide problems in the others.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::diagnostics::{Diagnostic, Diagnostics, Severity, Source};
use super::number::NumberPattern;
use super::raw::{RawPipeline, RawProfile, RawRoute, RawTenant, RawTrunk, RawUnknownSource};
use super::secret::{self, Secret, SecretRef};
use super::{
    AdminSettings, AgentAuth, AgentMode, AgentSettings, AwayAudio, CaFile, Config,
    DEEPGRAM_BASE_URL, DeepgramSettings, DigestCredentials, FailurePolicy, Listen,
    MAX_FALLBACK_PROMPT, MasterKey, MediaSettings, OnFailure, Pipeline, PortRange, Profile, Prompt,
    Retention, Route, SipSettings, TelnyxEncoding, Tenant, Trunk, TwilioApi, UnknownSource,
};

const DEFAULT_VAR_DIR: &str = "var";
const DEFAULT_RTP_PORTS: PortRange = PortRange {
    start: 20000,
    end: 20999,
};
const DEFAULT_MAX_CALLS: u32 = 100;
/// Ringing time before an outbound call is cancelled, when neither the request nor the trunk says.
const DEFAULT_ANSWER_TIMEOUT_S: u32 = 60;
/// Outbound calls a tenant may start per second by default.
const DEFAULT_MAX_OUTBOUND_CPS: u32 = 1;
const DEFAULT_REALM: &str = "sipbridge";
/// RFC 4028 §4: Min-SE is never below 90 seconds.
const MIN_SE_FLOOR_S: u32 = 90;
const PROMPT_RATES: std::ops::RangeInclusive<u32> = 8000..=48000;

/// Where something was written: file index and byte span.
type Loc = (usize, Range<usize>);

struct Item<T> {
    file: usize,
    value: T,
    /// Keys were removed after errors: defaults stand in for them, so checks
    /// that would blame a default are skipped.
    damaged: bool,
}

#[derive(Default)]
struct Parsed {
    profiles: Vec<Item<RawProfile>>,
    trunks: Vec<Item<RawTrunk>>,
    tenants: Vec<Item<RawTenant>>,
    routes: Vec<Item<RawRoute>>,
    /// Names of trunks/tenants whose item failed to parse: references to them
    /// are not reported as unknown.
    broken_trunks: HashSet<String>,
    broken_tenants: HashSet<String>,
    /// A file or item failed so badly that any reference could be to it.
    uncertain: bool,
}

struct Cx<'a> {
    sources: Vec<Source>,
    diags: Diagnostics,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Loading for a data command (issue 15): secrets other than the master
    /// key are not needed, so one that cannot be resolved is no error.
    data_only: bool,
}

impl Cx<'_> {
    fn error(&mut self, file: usize, span: Option<Range<usize>>, msg: impl Into<String>) {
        self.push(Severity::Error, file, span, msg.into());
    }

    fn warning(&mut self, file: usize, span: Option<Range<usize>>, msg: impl Into<String>) {
        self.push(Severity::Warning, file, span, msg.into());
    }

    fn push(&mut self, sev: Severity, file: usize, span: Option<Range<usize>>, msg: String) {
        if let Some(src) = self.sources.get(file) {
            let d = src.diagnostic(sev, span, msg);
            self.diags.push(d);
        }
    }

    fn error_at(&mut self, loc: &Loc, msg: impl Into<String>) {
        self.error(loc.0, Some(loc.1.clone()), msg);
    }

    /// `file:line:column` of a place, for "already defined at …" messages.
    fn place(&self, loc: &Loc) -> String {
        match self.sources.get(loc.0) {
            Some(src) => {
                let (l, c) = src.position(loc.1.start);
                format!("{}:{l}:{c}", src.path.display())
            }
            None => String::from("?"),
        }
    }

    /// Resolves a secret reference, reporting problems at its place. Inline
    /// secrets are accepted with a warning (in the diagnostics and the log).
    fn secret(&mut self, file: usize, written: &Spanned<String>, what: &str) -> Option<Secret> {
        match secret::resolve(written.get_ref(), self.env) {
            Ok(s) => {
                if *s.source() == SecretRef::Inline {
                    let msg = format!(
                        "{what} is written inline; prefer env:NAME, file:PATH or credential:NAME"
                    );
                    let place = self.place(&(file, written.span()));
                    tracing::warn!(place = %place, fingerprint = %s.fingerprint(), "{msg}");
                    self.warning(file, Some(written.span()), msg);
                }
                tracing::trace!(place = %self.place(&(file, written.span())), secret = ?s, "resolved {what}");
                Some(s)
            }
            Err(_) if self.data_only && what != "master_key" => Some(Secret::new(
                Vec::new(),
                secret::SecretRef::parse(written.get_ref()),
            )),
            Err(e) => {
                self.error(file, Some(written.span()), format!("{what}: {e}"));
                None
            }
        }
    }
}

pub(super) fn load(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    data_only: bool,
) -> Result<Config, Diagnostics> {
    let mut cx = Cx {
        sources: Vec::new(),
        diags: Diagnostics::default(),
        env,
        data_only,
    };
    let mut parsed = Parsed::default();
    for file in profile_files(path, &mut cx) {
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                cx.sources.push(Source::new(&file, text));
                parse_file(cx.sources.len() - 1, &mut cx, &mut parsed);
            }
            Err(e) => {
                parsed.uncertain = true;
                cx.diags.push(Diagnostic {
                    severity: Severity::Error,
                    file,
                    position: None,
                    message: format!("cannot read configuration: {e}"),
                });
            }
        }
    }
    let config = check(&mut cx, parsed);
    cx.diags.sort();
    if cx.diags.has_errors() {
        Err(cx.diags)
    } else {
        Ok(Config {
            warnings: cx.diags.items().to_vec(),
            ..config
        })
    }
}

/// The file itself, or the sorted `*.toml` files of a directory.
fn profile_files(path: &Path, cx: &mut Cx<'_>) -> Vec<PathBuf> {
    if !path.is_dir() {
        return vec![path.to_owned()];
    }
    let mut files: Vec<PathBuf> = match std::fs::read_dir(path) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect(),
        Err(e) => {
            cx.diags.push(Diagnostic {
                severity: Severity::Error,
                file: path.to_owned(),
                position: None,
                message: format!("cannot list directory: {e}"),
            });
            return Vec::new();
        }
    };
    files.sort();
    if files.is_empty() {
        cx.diags.push(Diagnostic {
            severity: Severity::Error,
            file: path.to_owned(),
            position: None,
            message: "directory holds no *.toml profile".to_owned(),
        });
    }
    files
}

fn parse_file(file: usize, cx: &mut Cx<'_>, parsed: &mut Parsed) {
    let Some(text) = cx.sources.get(file).map(|s| s.text.clone()) else {
        return;
    };
    let (doc, errors) = DeTable::parse_recoverable(&text);
    if !errors.is_empty() {
        // Syntax errors: report them all, but do not interpret a guessed document.
        parsed.uncertain = true;
        for e in errors {
            cx.error(file, e.span().or(Some(0..0)), e.message().trim().to_owned());
        }
        return;
    }
    let mut saw_profile = false;
    for (key, value) in doc.get_ref().iter() {
        let name: &str = key.get_ref();
        match name {
            "profile" => {
                saw_profile = true;
                if let Some((p, damaged)) = item::<RawProfile>(file, value, cx) {
                    parsed.profiles.push(Item { file, value: p, damaged });
                }
            }
            "trunk" | "tenant" | "route" => {
                let Some(elements) = value.get_ref().as_array() else {
                    cx.error(
                        file,
                        Some(key.span()),
                        format!("`{name}` must be an array of tables: write [[{name}]]"),
                    );
                    parsed.uncertain = true;
                    continue;
                };
                for el in elements.iter() {
                    match name {
                        "trunk" => match item::<RawTrunk>(file, el, cx) {
                            Some((t, damaged)) => parsed.trunks.push(Item { file, value: t, damaged }),
                            None => note_broken(el, "name", &mut parsed.broken_trunks, &mut parsed.uncertain),
                        },
                        "tenant" => match item::<RawTenant>(file, el, cx) {
                            Some((t, damaged)) => parsed.tenants.push(Item { file, value: t, damaged }),
                            None => note_broken(el, "id", &mut parsed.broken_tenants, &mut parsed.uncertain),
                        },
                        _ => {
                            if let Some((r, damaged)) = item::<RawRoute>(file, el, cx) {
                                parsed.routes.push(Item { file, value: r, damaged });
                            }
                        }
                    }
                }
            }
            other => cx.error(
                file,
                Some(key.span()),
                format!(
                    "unknown top-level key `{other}`, expected one of `profile`, `trunk`, `tenant`, `route`"
                ),
            ),
        }
    }
    if !saw_profile {
        cx.error(
            file,
            None,
            "no [profile] table: every configuration file is a profile",
        );
    }
}

/// Remembers the name of an item that failed to parse, so references to it
/// are not reported as unknown; without a readable name, every reference is uncertain.
fn note_broken(
    el: &Spanned<DeValue<'_>>,
    key: &str,
    names: &mut HashSet<String>,
    uncertain: &mut bool,
) {
    match el
        .get_ref()
        .as_table()
        .and_then(|t| t.get(key))
        .and_then(|v| v.get_ref().as_str())
    {
        Some(n) => {
            names.insert(n.to_owned());
        }
        None => *uncertain = true,
    }
}

/// Deserializes one item. On an error, the offending key or value is removed
/// and deserialization retried, so every unknown key and wrongly typed value
/// of the item is reported, and the rest of it is still checked. The result
/// is only used when the load fails anyway (the errors are recorded).
fn item<T: for<'de> Deserialize<'de>>(
    file: usize,
    value: &Spanned<DeValue<'_>>,
    cx: &mut Cx<'_>,
) -> Option<(T, bool)> {
    const MAX_RETRIES: usize = 64;
    let mut value = value.clone();
    for attempt in 0..MAX_RETRIES {
        let e = match T::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(v) => return Some((v, attempt > 0)),
            Err(e) => e,
        };
        // A field removed after a type error is then "missing": not a new problem.
        let missing = e.message().starts_with("missing field");
        if attempt == 0 || !missing {
            let span = e.span().or(Some(value.span()));
            cx.error(file, span, e.message().trim().to_owned());
        }
        match e.span() {
            Some(span) if !missing && span != value.span() => {
                if !remove_span(value.get_mut(), &span) {
                    return None;
                }
            }
            _ => return None,
        }
    }
    None
}

/// Removes the table entry whose key or value has exactly this span.
fn remove_span(value: &mut DeValue<'_>, span: &Range<usize>) -> bool {
    match value {
        DeValue::Table(table) => {
            let hit = table
                .iter()
                .find(|(k, v)| k.span() == *span || v.span() == *span)
                .map(|(k, _)| k.get_ref().to_string());
            if let Some(key) = hit {
                table.remove(key.as_str());
                return true;
            }
            table
                .iter_mut()
                .any(|(_, v)| remove_span(v.get_mut(), span))
        }
        DeValue::Array(items) => items.iter_mut().any(|v| remove_span(v.get_mut(), span)),
        _ => false,
    }
}

fn check(cx: &mut Cx<'_>, parsed: Parsed) -> Config {
    let Parsed {
        profiles: raw_profiles,
        trunks: raw_trunks,
        tenants: raw_tenants,
        routes: raw_routes,
        broken_trunks,
        broken_tenants,
        uncertain,
    } = parsed;

    // Tenants whose other fields are wrong still exist for cross-references.
    let declared_tenants: HashSet<String> = raw_tenants
        .iter()
        .map(|i| i.value.id.get_ref().clone())
        .collect();
    let transfer_trunks: Vec<(usize, String, Spanned<String>)> = raw_tenants
        .iter()
        .filter_map(|i| {
            let t = i.value.transfer_trunk.clone()?;
            Some((i.file, i.value.id.get_ref().clone(), t))
        })
        .collect();
    let tenants = check_tenants(cx, raw_tenants);
    let tenant_known =
        |id: &str| uncertain || broken_tenants.contains(id) || declared_tenants.contains(id);
    let trunks = check_trunks(cx, raw_trunks, &tenant_known);
    // Σ of trunk limits when every trunk has one: the most calls that can arrive.
    let trunk_sum = if trunks.is_empty() || trunks.iter().any(|(t, _)| t.max_calls.is_none()) {
        None
    } else {
        Some(
            trunks
                .iter()
                .filter_map(|(t, _)| t.max_calls)
                .map(u64::from)
                .sum::<u64>(),
        )
    };
    // A bridge transfer dials through the tenant's transfer trunk: it must
    // exist and let the tenant dial out.
    for (file, tenant, name) in &transfer_trunks {
        if uncertain || broken_trunks.contains(name.get_ref()) {
            continue;
        }
        match trunks.iter().find(|(t, _)| &t.name == name.get_ref()) {
            None => cx.error(
                *file,
                Some(name.span()),
                format!("transfer_trunk names unknown trunk `{}`", name.get_ref()),
            ),
            Some((t, _))
                if !t
                    .outbound
                    .as_ref()
                    .is_some_and(|o| o.tenants.iter().any(|x| x == tenant)) =>
            {
                cx.error(
                    *file,
                    Some(name.span()),
                    format!(
                        "transfer_trunk `{}` has no [trunk.outbound] that tenant `{tenant}` may use",
                        name.get_ref()
                    ),
                );
            }
            Some(_) => {}
        }
    }
    let profiles = check_profiles(cx, raw_profiles, trunk_sum);
    let trunk_known = |name: &str| {
        uncertain || broken_trunks.contains(name) || trunks.iter().any(|(t, _)| t.name == name)
    };
    let routes = check_routes(cx, raw_routes, &tenant_known, &trunk_known, &trunks);

    if !cx.diags.has_errors() {
        for (t, loc) in &tenants {
            if !routes.iter().any(|r| r.tenant == t.id) {
                cx.warning(
                    loc.0,
                    Some(loc.1.clone()),
                    format!("tenant `{}` has no route: it receives no calls", t.id),
                );
            }
        }
        if let Some(src) = cx.sources.first().filter(|_| routes.is_empty()) {
            let d = src.diagnostic(Severity::Warning, None, "no routes: every call gets 404");
            cx.diags.push(d);
        }
    }

    Config {
        profiles,
        trunks: trunks.into_iter().map(|(t, _)| t).collect(),
        tenants: tenants.into_iter().map(|(t, _)| t).collect(),
        routes,
        warnings: Vec::new(),
    }
}

/// Names of profiles, trunks and tenants appear in logs, metrics and paths.
fn check_name(cx: &mut Cx<'_>, file: usize, name: &Spanned<String>, what: &str) -> bool {
    let n = name.get_ref();
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !n.starts_with('.');
    if !ok {
        cx.error(
            file,
            Some(name.span()),
            format!(
                "{what} `{n}`: use 1-64 characters from A-Z a-z 0-9 - _ . (not starting with `.`)"
            ),
        );
    }
    ok
}

/// Records a name, reporting a duplicate. Returns false for a duplicate.
fn unique(
    cx: &mut Cx<'_>,
    seen: &mut HashMap<String, Loc>,
    file: usize,
    name: &Spanned<String>,
    what: &str,
) -> bool {
    let loc = (file, name.span());
    if let Some(first) = seen.get(name.get_ref()) {
        let msg = format!(
            "duplicate {what} `{}` (first defined at {})",
            name.get_ref(),
            cx.place(first)
        );
        cx.error_at(&loc, msg);
        false
    } else {
        seen.insert(name.get_ref().clone(), loc);
        true
    }
}

fn positive(cx: &mut Cx<'_>, file: usize, v: &Option<Spanned<u32>>, what: &str) -> Option<u32> {
    let v = v.as_ref()?;
    if *v.get_ref() == 0 {
        cx.error(file, Some(v.span()), format!("{what} must be at least 1"));
        None
    } else {
        Some(*v.get_ref())
    }
}

fn check_profiles(
    cx: &mut Cx<'_>,
    raw: Vec<Item<RawProfile>>,
    trunk_sum: Option<u64>,
) -> Vec<Profile> {
    let mut names = HashMap::new();
    // (transport, address) -> (profile name, place)
    let mut sockets: Vec<(&'static str, SocketAddr, String, Loc)> = Vec::new();
    let mut out = Vec::new();
    for Item {
        file,
        value: p,
        damaged,
    } in raw
    {
        check_name(cx, file, &p.name, "profile name");
        unique(cx, &mut names, file, &p.name, "profile name");
        let name = p.name.get_ref().clone();

        let var_dir = match &p.var_dir {
            Some(v) if v.get_ref().trim().is_empty() => {
                cx.error(file, Some(v.span()), "var_dir is empty");
                PathBuf::from(DEFAULT_VAR_DIR)
            }
            Some(v) => PathBuf::from(v.get_ref()),
            None => PathBuf::from(DEFAULT_VAR_DIR),
        };

        let mut listen = Listen::default();
        let raw_listen = p.listen.get_ref();
        for (transport, addrs) in [
            ("udp", &raw_listen.udp),
            ("tcp", &raw_listen.tcp),
            ("tls", &raw_listen.tls),
        ] {
            for a in addrs {
                let loc = (file, a.span());
                let Ok(addr) = a.get_ref().parse::<SocketAddr>() else {
                    cx.error_at(
                        &loc,
                        format!(
                            "`{}` is not a listen address: write IP:PORT, e.g. 127.0.0.1:5060 or [::1]:5060",
                            a.get_ref()
                        ),
                    );
                    continue;
                };
                let clash = sockets.iter().find(|(t, other, _, _)| {
                    *t == transport
                        && other.port() == addr.port()
                        && other.is_ipv4() == addr.is_ipv4()
                        && (other.ip() == addr.ip()
                            || other.ip().is_unspecified()
                            || addr.ip().is_unspecified())
                });
                if let Some((_, other, owner, first)) = clash {
                    let msg = format!(
                        "{transport} {addr} conflicts with {transport} {other} of profile `{owner}` at {}",
                        cx.place(first)
                    );
                    cx.error_at(&loc, msg);
                    continue;
                }
                sockets.push((transport, addr, name.clone(), loc));
                match transport {
                    "udp" => listen.udp.push(addr),
                    "tcp" => listen.tcp.push(addr),
                    _ => listen.tls.push(addr),
                }
            }
        }
        if raw_listen.udp.is_empty() && raw_listen.tcp.is_empty() && raw_listen.tls.is_empty() {
            cx.error(
                file,
                Some(p.listen.span()),
                "no listen address: give `udp`, `tcp` and/or `tls`",
            );
        }
        let tls = check_tls_identity(cx, file, &p, !raw_listen.tls.is_empty());

        let advertised_address =
            p.advertised_address
                .as_ref()
                .and_then(|a| match a.get_ref().parse::<IpAddr>() {
                    Ok(ip) if !ip.is_unspecified() => Some(ip),
                    _ => {
                        cx.error(
                            file,
                            Some(a.span()),
                            format!(
                                "advertised_address `{}` must be a specific IP address",
                                a.get_ref()
                            ),
                        );
                        None
                    }
                });

        let max_calls = positive(cx, file, &p.max_calls, "max_calls").unwrap_or(DEFAULT_MAX_CALLS);
        let rtp_ports = match &p.rtp_ports {
            Some(r) => {
                let (start, end) = (r.get_ref().start.get_ref(), r.get_ref().end.get_ref());
                let mut ok = true;
                if start % 2 != 0 {
                    cx.error(
                        file,
                        Some(r.get_ref().start.span()),
                        format!("rtp_ports start {start} must be even (RTP on even ports, RTCP on the next odd one)"),
                    );
                    ok = false;
                }
                if end <= start {
                    cx.error(
                        file,
                        Some(r.get_ref().end.span()),
                        format!("rtp_ports end {end} must be greater than start {start}"),
                    );
                    ok = false;
                }
                let range = PortRange {
                    start: *start,
                    end: *end,
                };
                if ok && !damaged {
                    let needed =
                        trunk_sum.map_or(u64::from(max_calls), |s| s.min(u64::from(max_calls)));
                    if u64::from(range.calls()) < needed {
                        cx.error(
                            file,
                            Some(r.span()),
                            format!(
                                "rtp_ports {start}-{end} hold {} calls at 2 ports each, but up to {needed} calls are allowed (max_calls); widen the range or lower the limits",
                                range.calls()
                            ),
                        );
                    }
                }
                range
            }
            None => {
                if u64::from(DEFAULT_RTP_PORTS.calls()) < u64::from(max_calls) && !damaged {
                    cx.error(
                        file,
                        p.max_calls.as_ref().map(Spanned::span),
                        format!(
                            "max_calls {max_calls} needs {} RTP ports; the default rtp_ports 20000-20999 hold {} calls: set rtp_ports",
                            u64::from(max_calls) * 2,
                            DEFAULT_RTP_PORTS.calls()
                        ),
                    );
                }
                DEFAULT_RTP_PORTS
            }
        };

        let master_key = check_master_key(cx, file, p.master_key.as_ref(), &var_dir, p.name.span());
        let sip = check_sip(cx, file, p.sip.as_ref());
        let media = media_settings(cx, file, p.media.as_ref());
        let admin = p.admin.as_ref().and_then(|a| {
            let listen = &a.get_ref().listen;
            let token = a
                .get_ref()
                .token
                .as_ref()
                .and_then(|t| cx.secret(file, t, "admin token"));
            let metrics_token = a
                .get_ref()
                .metrics_token
                .as_ref()
                .and_then(|t| cx.secret(file, t, "metrics token"));
            let download_deadline = Duration::from_secs(u64::from(bounded(
                cx,
                file,
                a.get_ref().download_deadline_s.as_ref(),
                "download_deadline_s",
                super::MAX_DOWNLOAD_DEADLINE_S,
                super::DEFAULT_DOWNLOAD_DEADLINE_S,
            )));
            let max_downloads_per_tenant = bounded(
                cx,
                file,
                a.get_ref().max_downloads_per_tenant.as_ref(),
                "max_downloads_per_tenant",
                super::MAX_DOWNLOADS_PER_TENANT,
                super::DEFAULT_MAX_DOWNLOADS_PER_TENANT,
            );
            match listen.get_ref().parse::<SocketAddr>() {
                Ok(listen) => Some(AdminSettings {
                    listen,
                    token,
                    metrics_token,
                    download_deadline,
                    max_downloads_per_tenant,
                }),
                Err(_) => {
                    cx.error(
                        file,
                        Some(listen.span()),
                        format!(
                            "admin listen `{}` is not an address: write IP:PORT, e.g. 127.0.0.1:8089",
                            listen.get_ref()
                        ),
                    );
                    None
                }
            }
        });
        let drain_grace = drain_grace(cx, file, p.drain_grace_s.as_ref());
        let (security, errors) = super::security::resolve(p.security.as_ref());
        for (span, msg) in errors {
            cx.error(file, Some(span), msg);
        }
        let mut sip = sip;
        if let Some(u) = security.unknown_source {
            sip.unknown_source = u;
        }
        let log_caller_data = log_caller_data(cx, file, p.logging.as_ref());
        let store = store_settings(cx, file, p.store.as_ref());
        let recordings = recordings_settings(cx, file, p.recordings.as_ref());

        out.push(Profile {
            name,
            file: cx
                .sources
                .get(file)
                .map(|s| s.path.clone())
                .unwrap_or_default(),
            var_dir,
            listen,
            advertised_address,
            rtp_ports,
            max_calls,
            master_key,
            sip,
            media,
            admin,
            drain_grace,
            security,
            log_caller_data,
            tls,
            store,
            recordings,
        });
    }
    out
}

/// `[profile.store]`: `min_free_mb` (0 turns the watermark off: only failed
/// writes count) and `check_interval_s` (1 to 3600).
fn store_settings(
    cx: &mut Cx<'_>,
    file: usize,
    raw: Option<&Spanned<super::raw::RawStore>>,
) -> super::StoreSettings {
    let mut out = super::StoreSettings::default();
    let Some(raw) = raw.map(Spanned::get_ref) else {
        return out;
    };
    if let Some(v) = &raw.min_free_mb {
        match v.get_ref().checked_mul(1024 * 1024) {
            Some(bytes) if *v.get_ref() <= 1 << 30 => out.min_free_bytes = bytes,
            _ => cx.error(
                file,
                Some(v.span()),
                format!("min_free_mb {} is larger than 1 PiB", v.get_ref()),
            ),
        }
    }
    if let Some(v) = &raw.check_interval_s {
        let secs = *v.get_ref();
        if (1..=3600).contains(&secs) {
            out.check_interval = Duration::from_secs(u64::from(secs));
        } else {
            cx.error(
                file,
                Some(v.span()),
                format!("check_interval_s {secs} must be 1 to 3600"),
            );
        }
    }
    out.engine = store_engine(cx, file, raw);
    out
}

/// `[profile.recordings]`: `kind = "local"` (default; no other key) or
/// `kind = "s3"` with `endpoint` (http:// or https://), `bucket` (S3 naming
/// rules), `region`, `access_key_id` and `secret_access_key` (secret
/// references) and `spool_max_mb` (1 to 1 TiB, default 1024).
fn recordings_settings(
    cx: &mut Cx<'_>,
    file: usize,
    raw: Option<&Spanned<super::raw::RawRecordings>>,
) -> super::Recordings {
    let Some(section) = raw else {
        return super::Recordings::Local;
    };
    let r = section.get_ref();
    let kind = r.kind.as_ref().map_or("local", |k| k.get_ref().as_str());
    match kind {
        "local" => {
            let extra = [
                ("endpoint", r.endpoint.as_ref().map(Spanned::span)),
                ("bucket", r.bucket.as_ref().map(Spanned::span)),
                ("region", r.region.as_ref().map(Spanned::span)),
                ("access_key_id", r.access_key_id.as_ref().map(Spanned::span)),
                (
                    "secret_access_key",
                    r.secret_access_key.as_ref().map(Spanned::span),
                ),
                ("spool_max_mb", r.spool_max_mb.as_ref().map(Spanned::span)),
            ];
            for (key, span) in extra {
                if let Some(span) = span {
                    cx.error(
                        file,
                        Some(span),
                        format!("{key} is only for kind = \"s3\" recordings"),
                    );
                }
            }
            return super::Recordings::Local;
        }
        "s3" => {}
        other => {
            let span = r.kind.as_ref().map(Spanned::span);
            cx.error(
                file,
                span,
                format!("recordings kind `{other}` is not \"local\" or \"s3\""),
            );
            return super::Recordings::Local;
        }
    }
    let mut ok = true;
    let mut required = |cx: &mut Cx<'_>, v: &Option<Spanned<String>>, key: &str| match v {
        Some(v) if !v.get_ref().trim().is_empty() => Some(v.get_ref().trim().to_owned()),
        Some(v) => {
            cx.error(file, Some(v.span()), format!("{key} is empty"));
            ok = false;
            None
        }
        None => {
            cx.error(
                file,
                Some(section.span()),
                format!("[profile.recordings] kind = \"s3\" needs {key}"),
            );
            ok = false;
            None
        }
    };
    let endpoint = required(cx, &r.endpoint, "endpoint");
    let bucket = required(cx, &r.bucket, "bucket");
    let region = required(cx, &r.region, "region");
    let _ = required(cx, &r.access_key_id, "access_key_id");
    let _ = required(cx, &r.secret_access_key, "secret_access_key");
    if let (Some(e), Some(span)) = (&endpoint, r.endpoint.as_ref().map(Spanned::span)) {
        let host = e
            .strip_prefix("https://")
            .or_else(|| e.strip_prefix("http://"));
        if host.is_none_or(|h| h.is_empty() || h.contains(char::is_whitespace)) {
            cx.error(
                file,
                Some(span),
                format!("endpoint `{e}` is not an http:// or https:// URL"),
            );
            ok = false;
        } else if e.starts_with("http://") {
            cx.warning(
                file,
                Some(span),
                "endpoint is plain http://: credentials' signatures and the (encrypted) recordings cross the network unprotected by TLS",
            );
        }
    }
    if let (Some(b), Some(span)) = (&bucket, r.bucket.as_ref().map(Spanned::span)) {
        let valid = (3..=63).contains(&b.len())
            && b.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
            && b.as_bytes()[0].is_ascii_alphanumeric()
            && b.as_bytes()[b.len() - 1].is_ascii_alphanumeric();
        if !valid {
            cx.error(
                file,
                Some(span),
                format!(
                    "bucket `{b}` is not a valid S3 bucket name (3 to 63 of a-z, 0-9, '-', '.')"
                ),
            );
            ok = false;
        }
    }
    let access_key_id = r
        .access_key_id
        .as_ref()
        .and_then(|v| cx.secret(file, v, "recordings access_key_id"));
    let secret_access_key = r
        .secret_access_key
        .as_ref()
        .and_then(|v| cx.secret(file, v, "recordings secret_access_key"));
    let mut spool_max_bytes = super::DEFAULT_SPOOL_MAX_MB * 1024 * 1024;
    if let Some(v) = &r.spool_max_mb {
        let mb = *v.get_ref();
        if (1..=1 << 20).contains(&mb) {
            spool_max_bytes = mb * 1024 * 1024;
        } else {
            cx.error(
                file,
                Some(v.span()),
                format!("spool_max_mb {mb} must be 1 to 1048576"),
            );
            ok = false;
        }
    }
    match (
        endpoint,
        bucket,
        region,
        access_key_id,
        secret_access_key,
        ok,
    ) {
        (
            Some(endpoint),
            Some(bucket),
            Some(region),
            Some(access_key_id),
            Some(secret_access_key),
            true,
        ) => super::Recordings::S3(super::S3Recordings {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            bucket,
            region,
            access_key_id,
            secret_access_key,
            spool_max_bytes,
        }),
        _ => super::Recordings::Local,
    }
}

/// `[profile.store] kind` (`"sqlite"`, the default, or `"postgres"`) and,
/// for PostgreSQL, `url`: a secret reference whose value must be a
/// `postgres://`/`postgresql://` URL or a key/value connection string the
/// client parses. The value is never shown; errors name its place.
fn store_engine(cx: &mut Cx<'_>, file: usize, raw: &super::raw::RawStore) -> super::StoreEngine {
    let kind = raw.kind.as_ref().map_or("sqlite", |k| k.get_ref().as_str());
    match kind {
        "sqlite" => {
            if let Some(url) = &raw.url {
                cx.error(
                    file,
                    Some(url.span()),
                    "url is for kind = \"postgres\"; the SQLite store is var_dir/sipbridge.db",
                );
            }
            super::StoreEngine::Sqlite
        }
        "postgres" => {
            let Some(written) = &raw.url else {
                let span = raw.kind.as_ref().map(Spanned::span);
                cx.error(
                    file,
                    span,
                    "kind = \"postgres\" needs url (a secret reference: env:NAME, file:PATH or credential:NAME)",
                );
                return super::StoreEngine::Sqlite;
            };
            let Some(url) = cx.secret(file, written, "store url") else {
                return super::StoreEngine::Sqlite;
            };
            // data_only runs (the CLI without the secret) get an empty value.
            if !url.expose().is_empty() {
                let parsed = std::str::from_utf8(url.expose())
                    .ok()
                    .and_then(|s| s.trim().parse::<postgres::Config>().ok());
                match parsed {
                    None => cx.error(
                        file,
                        Some(written.span()),
                        format!(
                            "store url ({}) is not a PostgreSQL connection URL \
                             (postgres://user@host:port/database)",
                            url.source()
                        ),
                    ),
                    Some(c) if c.get_hosts().is_empty() => cx.error(
                        file,
                        Some(written.span()),
                        format!("store url ({}) names no host", url.source()),
                    ),
                    Some(_) => {}
                }
            }
            super::StoreEngine::Postgres { url }
        }
        other => {
            let span = raw.kind.as_ref().map(Spanned::span);
            cx.error(
                file,
                span,
                format!("store kind {other:?} is not \"sqlite\" or \"postgres\""),
            );
            super::StoreEngine::Sqlite
        }
    }
}

/// `[profile.logging] caller_data`: `"masked"` (default) or `"full"`, which
/// is accepted with a warning (journald keeps what `erase` cannot reach).
fn log_caller_data(
    cx: &mut Cx<'_>,
    file: usize,
    raw: Option<&Spanned<super::raw::RawLogging>>,
) -> crate::logging::CallerData {
    let Some(v) = raw.and_then(|l| l.get_ref().caller_data.as_ref()) else {
        return crate::logging::CallerData::Masked;
    };
    match v.get_ref() {
        super::raw::RawCallerData::Masked => crate::logging::CallerData::Masked,
        super::raw::RawCallerData::Full => {
            cx.warning(
                file,
                Some(v.span()),
                "caller_data = \"full\": logs will hold callers' numbers, dialled numbers, transcript text \
                 and SIP bodies in full; `erase` cannot reach logs (journald, collectors). Use it only to debug",
            );
            crate::logging::CallerData::Full
        }
    }
}

/// `[profile.tls]`: required by `listen.tls`; the PEM chain and key must
/// parse and belong together (what `check` reports).
fn check_tls_identity(
    cx: &mut Cx<'_>,
    file: usize,
    p: &RawProfile,
    listens: bool,
) -> Option<super::TlsIdentity> {
    let Some(raw) = p.tls.as_ref() else {
        if listens {
            cx.error(
                file,
                Some(p.listen.span()),
                "listen.tls needs [profile.tls] with `cert` and `key` (e.g. file:/etc/sipbridge/tls.pem)",
            );
        }
        return None;
    };
    let raw = raw.get_ref();
    let cert = cx.secret(file, &raw.cert, "tls cert")?;
    let key = cx.secret(file, &raw.key, "tls key")?;
    let outbound_ca = match raw.outbound_ca.as_ref() {
        Some(c) => {
            let ca = cx.secret(file, c, "tls outbound_ca")?;
            if !cx.data_only
                && let Err(e) = super::tls::client_config(Some(ca.expose()))
            {
                cx.error(file, Some(c.span()), format!("tls outbound_ca: {e}"));
                return None;
            }
            Some(ca)
        }
        None => None,
    };
    let identity = super::TlsIdentity {
        cert,
        key,
        outbound_ca,
    };
    // Data commands leave unresolvable secrets empty: nothing to check then.
    if !cx.data_only
        && let Err(e) = super::tls::server_config(&identity, &[])
    {
        cx.error(file, Some(raw.cert.span()), format!("tls cert/key: {e}"));
        return None;
    }
    Some(identity)
}

/// `[profile] drain_grace_s`: 0 (BYE at once) up to [`super::MAX_DRAIN_GRACE_S`].
/// A setting from 1 to `max`; `default` when absent (or, with an error,
/// when out of range).
fn bounded(
    cx: &mut Cx<'_>,
    file: usize,
    raw: Option<&Spanned<u32>>,
    what: &str,
    max: u32,
    default: u32,
) -> u32 {
    let Some(v) = raw else {
        return default;
    };
    let n = *v.get_ref();
    if n == 0 || n > max {
        cx.error(
            file,
            Some(v.span()),
            format!("{what} {n} is out of range: write 1 to {max}"),
        );
        return default;
    }
    n
}

fn drain_grace(cx: &mut Cx<'_>, file: usize, raw: Option<&Spanned<u32>>) -> Duration {
    let Some(v) = raw else {
        return super::DEFAULT_DRAIN_GRACE;
    };
    let secs = *v.get_ref();
    if secs > super::MAX_DRAIN_GRACE_S {
        cx.error(
            file,
            Some(v.span()),
            format!(
                "drain_grace_s {secs} is longer than {} s",
                super::MAX_DRAIN_GRACE_S
            ),
        );
        return super::DEFAULT_DRAIN_GRACE;
    }
    Duration::from_secs(u64::from(secs))
}

fn check_master_key(
    cx: &mut Cx<'_>,
    file: usize,
    written: Option<&Spanned<String>>,
    var_dir: &Path,
    fallback_span: Range<usize>,
) -> MasterKey {
    let (reference, span) = match written {
        Some(w) => (SecretRef::parse(w.get_ref()), w.span()),
        None => (SecretRef::File(var_dir.join("master.key")), fallback_span),
    };
    if let SecretRef::File(path) = &reference {
        if path.as_os_str().is_empty() {
            cx.error(file, Some(span), "master_key: empty file path");
            return MasterKey::ToGenerate(path.clone());
        }
        if !path.exists() {
            cx.warning(
                file,
                Some(span),
                format!(
                    "master key file {} does not exist: it will be generated on first start",
                    path.display()
                ),
            );
            return MasterKey::ToGenerate(path.clone());
        }
        return match secret::resolve_raw_file(path) {
            Ok(s) => MasterKey::Loaded(s),
            Err(e) => {
                cx.error(file, Some(span), format!("master_key: {e}"));
                MasterKey::ToGenerate(path.clone())
            }
        };
    }
    let Some(w) = written else {
        return MasterKey::ToGenerate(var_dir.join("master.key"));
    };
    match cx.secret(file, w, "master_key") {
        Some(s) => MasterKey::Loaded(s),
        None => MasterKey::ToGenerate(PathBuf::new()),
    }
}

fn media_settings(
    cx: &mut Cx<'_>,
    file: usize,
    raw: Option<&Spanned<super::raw::RawMedia>>,
) -> MediaSettings {
    let mut m = MediaSettings::default();
    let Some(raw) = raw else { return m };
    let r = raw.get_ref();
    // 0 switches a limit off.
    let limit = |v: &Option<Spanned<u32>>, d: Option<Duration>| match v {
        None => d,
        Some(v) if *v.get_ref() == 0 => None,
        Some(v) => Some(Duration::from_secs(u64::from(*v.get_ref()))),
    };
    m.rtp_timeout = limit(&r.rtp_timeout_s, m.rtp_timeout);
    m.max_call_duration = limit(&r.max_call_duration_s, m.max_call_duration);
    if let Some(t) = &r.threads {
        if *t.get_ref() > super::MAX_MEDIA_THREADS {
            cx.error(
                file,
                Some(t.span()),
                format!(
                    "[profile.media] threads: {} is more than {} (0 = one per core)",
                    t.get_ref(),
                    super::MAX_MEDIA_THREADS
                ),
            );
        } else {
            m.threads = *t.get_ref();
        }
    }
    m
}

fn check_sip(
    cx: &mut Cx<'_>,
    file: usize,
    raw: Option<&Spanned<super::raw::RawSip>>,
) -> SipSettings {
    let mut s = SipSettings::default();
    let Some(raw) = raw else { return s };
    let r = raw.get_ref();
    let ms = |v: &Option<Spanned<u32>>, d: Duration| {
        v.as_ref()
            .map_or(d, |v| Duration::from_millis(u64::from(*v.get_ref())))
    };
    let secs = |v: &Option<Spanned<u32>>, d: Duration| {
        v.as_ref()
            .map_or(d, |v| Duration::from_secs(u64::from(*v.get_ref())))
    };
    s.t1 = ms(&r.t1_ms, s.t1);
    s.t2 = ms(&r.t2_ms, s.t2);
    s.t4 = ms(&r.t4_ms, s.t4);
    s.session_expires = secs(&r.session_expires_s, s.session_expires);
    s.min_se = secs(&r.min_se_s, s.min_se);
    s.answer_delay = ms(&r.answer_delay_ms, s.answer_delay);
    if let Some(u) = r.unknown_source {
        s.unknown_source = match u {
            RawUnknownSource::Reject => UnknownSource::Reject,
            RawUnknownSource::Drop => UnknownSource::Drop,
        };
    }
    let span_of = |v: &Option<Spanned<u32>>| Some(v.as_ref().map_or(raw.span(), Spanned::span));
    positive(cx, file, &r.t1_ms, "t1_ms");
    positive(cx, file, &r.t4_ms, "t4_ms");
    if s.t2 < s.t1 {
        cx.error(
            file,
            span_of(&r.t2_ms),
            format!(
                "t2_ms {} must not be below t1_ms {}",
                s.t2.as_millis(),
                s.t1.as_millis()
            ),
        );
    }
    if s.min_se < Duration::from_secs(u64::from(MIN_SE_FLOOR_S)) {
        cx.error(
            file,
            span_of(&r.min_se_s),
            format!(
                "min_se_s {} is below the RFC 4028 floor of {MIN_SE_FLOOR_S}",
                s.min_se.as_secs()
            ),
        );
    }
    if s.session_expires < s.min_se {
        cx.error(
            file,
            span_of(&r.session_expires_s),
            format!(
                "session_expires_s {} must not be below min_se_s {}",
                s.session_expires.as_secs(),
                s.min_se.as_secs()
            ),
        );
    }
    s
}

fn check_trunks(
    cx: &mut Cx<'_>,
    raw: Vec<Item<RawTrunk>>,
    tenant_known: &dyn Fn(&str) -> bool,
) -> Vec<(Trunk, Loc)> {
    let mut names = HashMap::new();
    let mut networks: HashMap<IpNet, (String, Loc)> = HashMap::new();
    let mut out = Vec::new();
    for Item {
        file,
        value: t,
        damaged,
    } in raw
    {
        check_name(cx, file, &t.name, "trunk name");
        unique(cx, &mut names, file, &t.name, "trunk name");
        let mut allow = Vec::new();
        for a in &t.allow {
            let loc = (file, a.span());
            let text = a.get_ref().trim();
            let net = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
            match net {
                Ok(net) => {
                    if let Some((owner, first)) = networks.get(&net) {
                        if *owner != *t.name.get_ref() {
                            let msg = format!(
                                "{net} is already allowed for trunk `{owner}` at {}: a source must identify one trunk",
                                cx.place(first)
                            );
                            cx.error_at(&loc, msg);
                        }
                    } else {
                        networks.insert(net, (t.name.get_ref().clone(), loc));
                    }
                    allow.push(net);
                }
                Err(_) => cx.error_at(
                    &loc,
                    format!(
                        "`{}` is not a CIDR (e.g. 192.0.2.0/24, 2001:db8::/32) or IP address",
                        a.get_ref()
                    ),
                ),
            }
        }
        let digest = t.digest.as_ref().and_then(|d| {
            let d_ref = d.get_ref();
            if d_ref.username.get_ref().is_empty() {
                cx.error(
                    file,
                    Some(d_ref.username.span()),
                    "digest username is empty",
                );
            }
            let mut algorithms = Vec::new();
            for a in d_ref.algorithms.iter().flatten() {
                match a.get_ref().to_ascii_uppercase().as_str() {
                    "SHA-256" => algorithms.push(crate::sip::digest::Algorithm::Sha256),
                    "MD5" => algorithms.push(crate::sip::digest::Algorithm::Md5),
                    other => cx.error(
                        file,
                        Some(a.span()),
                        format!("digest algorithm `{other}` is not supported (SHA-256, MD5)"),
                    ),
                }
            }
            if algorithms.is_empty() {
                algorithms = vec![
                    crate::sip::digest::Algorithm::Sha256,
                    crate::sip::digest::Algorithm::Md5,
                ];
            }
            let password = cx.secret(file, &d_ref.password, "digest password")?;
            Some(DigestCredentials {
                algorithms,
                username: d_ref.username.get_ref().clone(),
                password,
                realm: d_ref
                    .realm
                    .as_ref()
                    .map_or(DEFAULT_REALM.to_owned(), |r| r.get_ref().clone()),
            })
        });
        if t.allow.is_empty() && t.digest.is_none() && !damaged {
            cx.error(
                file,
                Some(t.name.span()),
                format!(
                    "trunk `{}` accepts nothing: give `allow` source CIDRs (and optionally [trunk.digest] credentials)",
                    t.name.get_ref()
                ),
            );
        }
        if t.allow.is_empty() && t.digest.is_some() && !damaged {
            // Calls find their trunk by source address before any challenge:
            // a digest trunk without networks could never be reached.
            cx.error(
                file,
                Some(t.name.span()),
                format!(
                    "trunk `{}` has [trunk.digest] but no `allow`: calls are matched to a trunk by source address before the challenge, so it can never match; list the networks its calls come from (allow = [\"0.0.0.0/0\", \"::/0\"] for digest from anywhere)",
                    t.name.get_ref()
                ),
            );
        }
        if let Some(tenant) = t.tenant.as_ref().filter(|x| !tenant_known(x.get_ref())) {
            cx.error(
                file,
                Some(tenant.span()),
                format!(
                    "trunk `{}` names unknown tenant `{}`",
                    t.name.get_ref(),
                    tenant.get_ref()
                ),
            );
        }
        let max_calls = positive(cx, file, &t.max_calls, "max_calls");
        let media_encryption = match t.media_encryption {
            Some(super::raw::RawMediaEncryption::Required) => super::MediaEncryption::Required,
            Some(super::raw::RawMediaEncryption::Optional) => super::MediaEncryption::Optional,
            Some(super::raw::RawMediaEncryption::Off) | None => super::MediaEncryption::Off,
        };
        let tls_client_ca = t.tls_client_ca.as_ref().and_then(|c| {
            let ca = cx.secret(file, c, "tls_client_ca")?;
            if cx.data_only {
                return Some(ca);
            }
            match super::tls::client_verifier(ca.expose()) {
                Ok(_) => Some(ca),
                Err(e) => {
                    cx.error(file, Some(c.span()), format!("tls_client_ca: {e}"));
                    None
                }
            }
        });
        let outbound = t.outbound.as_ref().map(|o| {
            let o_ref = o.get_ref();
            let proxy = o_ref.proxy.get_ref();
            let proxy_ok = match proxy.rsplit_once(':') {
                Some((host, port)) => {
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    !host.is_empty()
                        && port.parse::<u16>().is_ok_and(|p| p > 0)
                        && crate::sip::message::Host::parse(host).is_ok()
                }
                None => false,
            };
            if !proxy_ok {
                cx.error(
                    file,
                    Some(o_ref.proxy.span()),
                    format!("outbound proxy `{proxy}` is not `host:port` (e.g. \"sip.carrier.example:5060\", \"192.0.2.10:5060\")"),
                );
            }
            let transport = match o_ref.transport.as_ref().map(|v| v.get_ref().to_ascii_lowercase()) {
                None => super::OutboundTransport::Udp,
                Some(v) if v == "udp" => super::OutboundTransport::Udp,
                Some(v) => {
                    cx.error(
                        file,
                        o_ref.transport.as_ref().map(Spanned::span),
                        format!("outbound transport `{v}` is not supported: outbound calls use udp"),
                    );
                    super::OutboundTransport::Udp
                }
            };
            let password = match (&o_ref.username, &o_ref.password) {
                (Some(_), Some(p)) => cx.secret(file, p, "outbound password"),
                (None, None) => None,
                (Some(u), None) => {
                    cx.error(file, Some(u.span()), "outbound username without `password`");
                    None
                }
                (None, Some(p)) => {
                    cx.error(file, Some(p.span()), "outbound password without `username`");
                    None
                }
            };
            if let Some(u) = o_ref.username.as_ref().filter(|u| u.get_ref().is_empty()) {
                cx.error(file, Some(u.span()), "outbound username is empty");
            }
            if let Some(d) = &o_ref.from_domain
                && crate::sip::message::Host::parse(d.get_ref()).is_err()
            {
                cx.error(
                    file,
                    Some(d.span()),
                    format!("from_domain `{}` is not a host name or IP address", d.get_ref()),
                );
            }
            let mut tenants: Vec<String> = Vec::new();
            for name in o_ref.tenants.iter().flatten() {
                if !tenant_known(name.get_ref()) {
                    cx.error(
                        file,
                        Some(name.span()),
                        format!(
                            "trunk `{}` lets unknown tenant `{}` dial out",
                            t.name.get_ref(),
                            name.get_ref()
                        ),
                    );
                }
                tenants.push(name.get_ref().clone());
            }
            if o_ref.tenants.is_none()
                && let Some(owner) = &t.tenant
            {
                tenants.push(owner.get_ref().clone());
            }
            if tenants.is_empty() && !damaged {
                cx.error(
                    file,
                    Some(o.span()),
                    format!(
                        "trunk `{}` has [trunk.outbound] but no tenant may use it: set the trunk's `tenant` or `outbound.tenants`",
                        t.name.get_ref()
                    ),
                );
            }
            let answer_timeout = match &o_ref.answer_timeout_s {
                Some(v) if !(1..=600).contains(v.get_ref()) => {
                    cx.error(
                        file,
                        Some(v.span()),
                        format!("answer_timeout_s {} is out of range (1-600)", v.get_ref()),
                    );
                    DEFAULT_ANSWER_TIMEOUT_S
                }
                Some(v) => *v.get_ref(),
                None => DEFAULT_ANSWER_TIMEOUT_S,
            };
            super::OutboundTrunk {
                proxy: proxy.clone(),
                transport,
                username: o_ref.username.as_ref().map(|u| u.get_ref().clone()),
                password,
                from_domain: o_ref.from_domain.as_ref().map(|d| d.get_ref().clone()),
                tenants,
                answer_timeout: std::time::Duration::from_secs(u64::from(answer_timeout)),
            }
        });
        out.push((
            Trunk {
                name: t.name.get_ref().clone(),
                allow,
                digest,
                tenant: t.tenant.as_ref().map(|s| s.get_ref().clone()),
                max_calls,
                behind_nat: t.behind_nat,
                media_encryption,
                tls_client_ca,
                outbound,
            },
            (file, t.name.span()),
        ));
    }
    out
}

fn check_tenants(cx: &mut Cx<'_>, raw: Vec<Item<RawTenant>>) -> Vec<(Tenant, Loc)> {
    let mut ids = HashMap::new();
    let mut account_sids = HashMap::new();
    let mut out = Vec::new();
    for Item {
        file,
        value: t,
        damaged,
    } in raw
    {
        check_name(cx, file, &t.id, "tenant id");
        unique(cx, &mut ids, file, &t.id, "tenant id");
        let prompt = t.prompt.as_ref().and_then(|p| check_prompt(cx, file, p));
        if (t.recording || t.transcripts) && t.prompt.is_none() && !damaged {
            cx.error(
                file,
                Some(t.id.span()),
                format!(
                    "tenant `{}` stores recordings or transcripts but has no disclosure `prompt`",
                    t.id.get_ref()
                ),
            );
        }
        let opt_out_key = t.opt_out_key.as_ref().and_then(|k| {
            let mut chars = k.get_ref().chars();
            match (chars.next(), chars.next()) {
                (Some(c @ ('0'..='9' | '*' | '#')), None) => Some(c),
                _ => {
                    cx.error(
                        file,
                        Some(k.span()),
                        format!(
                            "opt_out_key `{}` must be one DTMF key: 0-9, * or #",
                            k.get_ref()
                        ),
                    );
                    None
                }
            }
        });
        let mut retention = Retention::default();
        if let Some(r) = &t.retention {
            let r = r.get_ref();
            let fix = |v: &Option<Spanned<u32>>, d: u32| v.as_ref().map_or(d, |v| *v.get_ref());
            retention.recordings_days = fix(&r.recordings_days, retention.recordings_days);
            retention.transcripts_days = fix(&r.transcripts_days, retention.transcripts_days);
            retention.metadata_days = fix(&r.metadata_days, retention.metadata_days);
            for (v, what) in [
                (&r.recordings_days, "recordings_days"),
                (&r.transcripts_days, "transcripts_days"),
                (&r.metadata_days, "metadata_days"),
            ] {
                if v.as_ref().is_some_and(|v| *v.get_ref() == 0) {
                    positive(cx, file, v, what);
                }
            }
        }
        let longest = retention
            .recordings_days
            .max(retention.transcripts_days)
            .max(retention.metadata_days);
        retention.audit_days = retention.audit_days.max(longest);
        if let Some(a) = t
            .retention
            .as_ref()
            .and_then(|r| r.get_ref().audit_days.as_ref())
        {
            if *a.get_ref() < longest {
                cx.error(
                    file,
                    Some(a.span()),
                    format!(
                        "audit_days {} is shorter than the longest data retention ({longest} days): \
                         the record of a deletion must outlive the data",
                        a.get_ref()
                    ),
                );
            } else {
                retention.audit_days = *a.get_ref();
            }
        }
        let on_store_failure = match &t.on_store_failure {
            None => super::OnStoreFailure::AnswerUnrecorded,
            Some(v) => {
                if !t.recording {
                    cx.warning(
                        file,
                        Some(v.span()),
                        format!(
                            "on_store_failure has no effect: tenant `{}` does not record",
                            t.id.get_ref()
                        ),
                    );
                }
                match v.get_ref() {
                    super::raw::RawOnStoreFailure::AnswerUnrecorded => {
                        super::OnStoreFailure::AnswerUnrecorded
                    }
                    super::raw::RawOnStoreFailure::Reject => super::OnStoreFailure::Reject,
                }
            }
        };
        let pipeline = check_pipeline(cx, file, &t.pipeline, damaged);
        let pipeline_failure = check_failure_policy(cx, file, t.pipeline.get_ref());
        let max_calls = positive(cx, file, &t.max_calls, "max_calls");
        let max_outbound_cps = positive(cx, file, &t.max_outbound_cps, "max_outbound_cps")
            .unwrap_or(DEFAULT_MAX_OUTBOUND_CPS);
        let transfer_fallback_bridge = match &t.transfer_fallback {
            None => false,
            Some(v) => match v.get_ref().as_str() {
                "none" => false,
                "bridge" => true,
                other => {
                    cx.error(
                        file,
                        Some(v.span()),
                        format!("transfer_fallback `{other}` is not `none` or `bridge`"),
                    );
                    false
                }
            },
        };
        let stats_interval = match &t.stats_interval_s {
            Some(v) if *v.get_ref() > 3600 => {
                cx.error(
                    file,
                    Some(v.span()),
                    format!("stats_interval_s {} must be at most 3600", v.get_ref()),
                );
                None
            }
            _ => positive(cx, file, &t.stats_interval_s, "stats_interval_s")
                .map(|s| std::time::Duration::from_secs(u64::from(s))),
        };
        let pipeline_rate = match &t.pipeline_rate {
            None => 16_000,
            Some(r) if matches!(*r.get_ref(), 8_000 | 16_000) => *r.get_ref(),
            Some(r) => {
                cx.error(
                    file,
                    Some(r.span()),
                    format!("pipeline_rate {} must be 8000 or 16000", r.get_ref()),
                );
                16_000
            }
        };
        // L16 streams the 16 kHz pipeline audio as it is: no 8 kHz pipeline.
        let raw_pipeline = t.pipeline.get_ref();
        if let (Some(e), Some(r)) = (&raw_pipeline.encoding, &t.pipeline_rate)
            && e.get_ref() == "L16"
            && raw_pipeline
                .mode
                .as_ref()
                .is_some_and(|m| m.get_ref() == "telnyx")
            && *r.get_ref() == 8_000
        {
            cx.error(
                file,
                Some(e.span()),
                "telnyx encoding `L16` is 16 kHz: it needs pipeline_rate 16000 (the default)",
            );
        }
        let admin_token_sha256 = t.admin_token_sha256.as_ref().and_then(|h| {
            let mut hash = [0u8; 32];
            match hex::decode_to_slice(h.get_ref(), &mut hash) {
                Ok(()) => Some(hash),
                Err(_) => {
                    cx.error(
                        file,
                        Some(h.span()),
                        "admin_token_sha256 must be 64 hex digits: the SHA-256 of the token \
                         (`sipbridge admin-token --tenant ID` prints a token and its hash)",
                    );
                    None
                }
            }
        });
        let events = check_events(cx, file, &t);
        let twilio_api = t.twilio_api.as_ref().and_then(|api| {
            let api = api.get_ref();
            let sid = api.account_sid.get_ref();
            let sid_ok =
                (2..=64).contains(&sid.len()) && sid.bytes().all(|b| b.is_ascii_alphanumeric());
            if !sid_ok {
                cx.error(
                    file,
                    Some(api.account_sid.span()),
                    format!(
                        "twilio_api account_sid `{}` must be 2-64 letters and digits \
                         (Twilio's form is AC followed by 32 hex digits)",
                        sid.escape_default()
                    ),
                );
            }
            unique(
                cx,
                &mut account_sids,
                file,
                &api.account_sid,
                "twilio_api account_sid",
            );
            let token = cx.secret(file, &api.auth_token, "twilio_api auth_token");
            match token {
                // Data commands leave unresolvable secrets empty: nothing to check.
                Some(t) if t.expose().len() < 16 && !cx.data_only => {
                    cx.error(
                        file,
                        Some(api.auth_token.span()),
                        "twilio_api auth_token must be at least 16 bytes",
                    );
                    None
                }
                Some(auth_token) if sid_ok => Some(TwilioApi {
                    account_sid: sid.clone(),
                    auth_token,
                }),
                _ => None,
            }
        });
        if let Some(pipeline) = pipeline {
            out.push((
                Tenant {
                    id: t.id.get_ref().clone(),
                    recording: t.recording,
                    transcripts: t.transcripts,
                    prompt,
                    opt_out_key,
                    paused_dtmf_to_agent: t.paused_dtmf_to_agent,
                    caller_audio_after_prompt: t.caller_audio_after_prompt.unwrap_or(true),
                    pipeline_rate,
                    early_media: t.early_media,
                    on_store_failure,
                    hash_caller_numbers: matches!(
                        t.caller_numbers,
                        Some(super::raw::RawCallerNumbers::Hashed)
                    ),
                    retention,
                    pipeline,
                    pipeline_failure,
                    max_calls,
                    max_outbound_cps,
                    transfer_trunk: t.transfer_trunk.as_ref().map(|v| v.get_ref().clone()),
                    transfer_fallback_bridge,
                    admin_token_sha256,
                    twilio_api,
                    stats_interval,
                    events,
                },
                (file, t.id.span()),
            ));
        }
    }
    out
}

/// A tenant's call event webhook settings (`events_*`): an `https://` URL
/// with a host and no user info, a signing secret of at least 16 bytes, a
/// CA bundle that parses, known event types, a queue of 1 to
/// [`super::MAX_EVENTS_QUEUE`].
fn check_events(cx: &mut Cx<'_>, file: usize, t: &RawTenant) -> Option<super::EventsTarget> {
    let (url, secret) = match (&t.events_url, &t.events_secret) {
        (None, None) => {
            let stray = [
                t.events_ca.as_ref().map(|c| (c.span(), "events_ca")),
                t.events_types.as_ref().map(|c| (c.span(), "events_types")),
                t.events_queue.as_ref().map(|c| (c.span(), "events_queue")),
            ];
            for (span, what) in stray.into_iter().flatten() {
                cx.error(file, Some(span), format!("{what} needs events_url"));
            }
            return None;
        }
        (Some(u), None) => {
            cx.error(
                file,
                Some(u.span()),
                "events_url needs events_secret (the HMAC-SHA256 key of Sipbridge-Signature, \
                 e.g. env:EVENTS_SECRET)",
            );
            return None;
        }
        (None, Some(s)) => {
            cx.error(file, Some(s.span()), "events_secret needs events_url");
            return None;
        }
        (Some(u), Some(s)) => (u, s),
    };
    let parsed = parse_events_url(url.get_ref());
    if let Err(why) = &parsed {
        cx.error(
            file,
            Some(url.span()),
            format!("events_url `{}`: {why}", url.get_ref().escape_default()),
        );
    }
    let secret = match cx.secret(file, secret, "events_secret") {
        Some(v) if v.expose().len() < 16 && !cx.data_only => {
            cx.error(
                file,
                Some(secret.span()),
                "events_secret must be at least 16 bytes",
            );
            None
        }
        other => other,
    };
    // `Some(None)`: no extra CA; `None`: a wrong one (reported).
    let ca = match &t.events_ca {
        Some(c) => match cx.secret(file, c, "events_ca") {
            Some(ca) => {
                if !cx.data_only
                    && let Err(e) = super::tls::client_config(Some(ca.expose()))
                {
                    cx.error(file, Some(c.span()), format!("events_ca: {e}"));
                    None
                } else {
                    Some(Some(ca))
                }
            }
            None => None,
        },
        None => Some(None),
    };
    let mut types = Vec::new();
    if let Some(list) = &t.events_types {
        if list.get_ref().is_empty() {
            cx.error(
                file,
                Some(list.span()),
                "events_types is empty: leave it out to send every event",
            );
        }
        for ty in list.get_ref() {
            let name = ty.get_ref();
            let known = match name.strip_suffix(".*") {
                Some(family) => super::EVENT_TYPES
                    .iter()
                    .any(|k| k.split('.').next() == Some(family)),
                None => super::EVENT_TYPES.contains(&name.as_str()),
            };
            if known {
                types.push(name.clone());
            } else {
                cx.error(
                    file,
                    Some(ty.span()),
                    format!(
                        "events_types: unknown event type `{}` (known: {}, or a family such as `transfer.*`)",
                        name.escape_default(),
                        super::EVENT_TYPES.join(", ")
                    ),
                );
            }
        }
    }
    let queue = bounded(
        cx,
        file,
        t.events_queue.as_ref(),
        "events_queue",
        super::MAX_EVENTS_QUEUE,
        u32::try_from(super::DEFAULT_EVENTS_QUEUE).unwrap_or(1000),
    );
    let (host, port, path) = parsed.ok()?;
    Some(super::EventsTarget {
        url: url.get_ref().clone(),
        host,
        port,
        path,
        secret: secret?,
        ca: ca?,
        types,
        queue: usize::try_from(queue).unwrap_or(super::DEFAULT_EVENTS_QUEUE),
    })
}

/// `https://host[:port][/path][?query]` → (host, port, path and query).
fn parse_events_url(url: &str) -> Result<(String, u16, String), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL ({e})"))?;
    if uri.scheme_str() != Some("https") {
        return Err("must start with https:// (events are signed, and sent only over TLS)".into());
    }
    let authority = uri.authority().ok_or("has no host")?;
    if authority.as_str().contains('@') {
        return Err("must not carry a user name or password (the signature authenticates)".into());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err("has no host".into());
    }
    let path = uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let path = if path.is_empty() { "/" } else { path };
    Ok((
        host.to_owned(),
        authority.port_u16().unwrap_or(443),
        path.to_owned(),
    ))
}

/// Checks that a prompt is a RIFF WAV, 16-bit integer PCM, mono or stereo, 8–48 kHz.
fn check_prompt(cx: &mut Cx<'_>, file: usize, written: &Spanned<String>) -> Option<Prompt> {
    let path = PathBuf::from(written.get_ref());
    let fail = |cx: &mut Cx<'_>, why: String| {
        cx.error(
            file,
            Some(written.span()),
            format!("prompt {}: {why}", path.display()),
        );
        None
    };
    let reader = match hound::WavReader::open(&path) {
        Ok(r) => r,
        Err(hound::Error::IoError(e)) => return fail(cx, format!("cannot read: {e}")),
        Err(e) => return fail(cx, format!("not a supported WAV file: {e}")),
    };
    let spec = reader.spec();
    if spec.sample_format != hound::SampleFormat::Int || spec.bits_per_sample != 16 {
        return fail(
            cx,
            format!(
                "{}-bit {:?} samples; prompts must be 16-bit PCM",
                spec.bits_per_sample, spec.sample_format
            ),
        );
    }
    if !(1..=2).contains(&spec.channels) {
        return fail(
            cx,
            format!("{} channels; prompts must be mono or stereo", spec.channels),
        );
    }
    if !PROMPT_RATES.contains(&spec.sample_rate) {
        return fail(
            cx,
            format!("{} Hz; prompts must be 8000-48000 Hz", spec.sample_rate),
        );
    }
    let frames = u64::from(reader.duration());
    if frames == 0 {
        return fail(cx, "holds no audio".to_owned());
    }
    Some(Prompt {
        path,
        sample_rate: spec.sample_rate,
        channels: spec.channels,
        duration_ms: frames * 1000 / u64::from(spec.sample_rate),
    })
}

fn check_pipeline(
    cx: &mut Cx<'_>,
    file: usize,
    raw: &Spanned<RawPipeline>,
    damaged: bool,
) -> Option<Pipeline> {
    let p = raw.get_ref();
    let kind = p.kind.get_ref().as_str();
    let (deepgram, agent) = match kind {
        "echo" => (false, false),
        "deepgram" => (true, false),
        "agent" => (false, true),
        "deepgram+agent" => (true, true),
        other => {
            cx.error(
                file,
                Some(p.kind.span()),
                format!("unknown pipeline kind `{other}`, expected echo, deepgram, agent or deepgram+agent"),
            );
            return None;
        }
    };
    let mut ok = true;
    let fields: [(&str, Option<Range<usize>>, bool); 8] = [
        ("model", p.model.as_ref().map(Spanned::span), deepgram),
        ("language", p.language.as_ref().map(Spanned::span), deepgram),
        ("api_key", p.api_key.as_ref().map(Spanned::span), deepgram),
        ("url", p.url.as_ref().map(Spanned::span), agent),
        ("mode", p.mode.as_ref().map(Spanned::span), agent),
        ("encoding", p.encoding.as_ref().map(Spanned::span), agent),
        ("auth", p.auth.as_ref().map(Spanned::span), agent),
        ("ca_file", p.ca_file.as_ref().map(Spanned::span), agent),
    ];
    // The Deepgram-only keys that are not strings.
    let deepgram_only: [(&str, Option<Range<usize>>); 5] = [
        (
            "endpointing_ms",
            p.endpointing_ms.as_ref().map(Spanned::span),
        ),
        (
            "interim_results",
            p.interim_results.as_ref().map(Spanned::span),
        ),
        (
            "utterance_end_ms",
            p.utterance_end_ms.as_ref().map(Spanned::span),
        ),
        ("vad_events", p.vad_events.as_ref().map(Spanned::span)),
        ("base_url", p.base_url.as_ref().map(Spanned::span)),
    ];
    let misplaced = fields
        .into_iter()
        .chain(deepgram_only.into_iter().map(|(n, s)| (n, s, deepgram)));
    for (name, span, allowed) in misplaced {
        if let (Some(span), false) = (span, allowed) {
            cx.error(
                file,
                Some(span),
                format!("`{name}` does not apply to pipeline kind `{kind}`"),
            );
            ok = false;
        }
    }
    let mut required =
        |cx: &mut Cx<'_>, name: &str, v: &Option<Spanned<String>>| -> Option<Spanned<String>> {
            match v {
                Some(v) if !v.get_ref().trim().is_empty() => Some(v.clone()),
                Some(v) => {
                    cx.error(file, Some(v.span()), format!("`{name}` is empty"));
                    ok = false;
                    None
                }
                None => {
                    if !damaged {
                        cx.error(
                            file,
                            Some(raw.span()),
                            format!("pipeline kind `{kind}` needs `{name}`"),
                        );
                    }
                    ok = false;
                    None
                }
            }
        };
    let mut dg_ok = true;
    let dg = if deepgram {
        let model = required(cx, "model", &p.model);
        let language = required(cx, "language", &p.language);
        let key = required(cx, "api_key", &p.api_key);
        let api_key = key.and_then(|k| cx.secret(file, &k, "deepgram api_key"));
        let interim_results = p.interim_results.as_ref().is_some_and(|v| *v.get_ref());
        if let Some(u) = &p.utterance_end_ms
            && !interim_results
        {
            cx.error(
                file,
                Some(u.span()),
                "`utterance_end_ms` needs `interim_results = true` (Deepgram sends UtteranceEnd only with interim results)",
            );
            dg_ok = false;
        }
        let base_url = match &p.base_url {
            None => Some(DEEPGRAM_BASE_URL.to_owned()),
            Some(u) => {
                let s = u.get_ref();
                if (s.starts_with("ws://") || s.starts_with("wss://"))
                    && !s.contains(|c: char| c.is_whitespace() || c == '?' || c == '#' || c == '@')
                {
                    Some(s.trim_end_matches('/').to_owned())
                } else {
                    cx.error(
                        file,
                        Some(u.span()),
                        format!("deepgram base_url `{s}` must start with ws:// or wss:// and have no credentials, query or fragment"),
                    );
                    None
                }
            }
        };
        match (model, language, api_key, base_url) {
            (Some(m), Some(l), Some(k), Some(base_url)) => Some(DeepgramSettings {
                model: m.into_inner(),
                language: l.into_inner(),
                api_key: k,
                endpointing_ms: p.endpointing_ms.as_ref().map(|v| *v.get_ref()),
                interim_results,
                utterance_end_ms: p.utterance_end_ms.as_ref().map(|v| *v.get_ref()),
                vad_events: p.vad_events.as_ref().is_some_and(|v| *v.get_ref()),
                base_url,
            }),
            _ => None,
        }
    } else {
        None
    };
    let ag = if agent {
        let url = required(cx, "url", &p.url).and_then(|u| {
            let s = u.get_ref();
            if (s.starts_with("ws://") || s.starts_with("wss://"))
                && !s.contains(char::is_whitespace)
            {
                Some(u.into_inner())
            } else {
                cx.error(
                    file,
                    Some(u.span()),
                    format!("agent url `{s}` must start with ws:// or wss://"),
                );
                None
            }
        });
        let mode = match p.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
            None | Some(("native", _)) => Some(AgentMode::Native),
            Some(("twilio", _)) => Some(AgentMode::Twilio),
            Some(("telnyx", _)) => match &p.encoding {
                None => Some(AgentMode::Telnyx(TelnyxEncoding::Pcmu)),
                Some(e) => match TelnyxEncoding::from_name(e.get_ref()) {
                    Some(enc) => Some(AgentMode::Telnyx(enc)),
                    None => {
                        cx.error(
                            file,
                            Some(e.span()),
                            format!(
                                "telnyx encoding `{}` must be `PCMU`, `PCMA` or `L16`",
                                e.get_ref()
                            ),
                        );
                        None
                    }
                },
            },
            Some((other, span)) => {
                cx.error(
                    file,
                    Some(span),
                    format!("agent mode `{other}` must be `native`, `twilio` or `telnyx`"),
                );
                None
            }
        };
        if let Some(e) = &p.encoding
            && p.mode.as_ref().is_none_or(|m| m.get_ref() != "telnyx")
        {
            cx.error(
                file,
                Some(e.span()),
                "`encoding` applies only to mode = \"telnyx\"",
            );
            ok = false;
        }
        let auth = match &p.auth {
            Some(a) => check_agent_auth(cx, file, a).map(Some),
            None => Some(None),
        };
        let ca_file = match &p.ca_file {
            Some(c) => check_ca_file(cx, file, c).map(Some),
            None => Some(None),
        };
        if let (Some(c), Some(u)) = (&p.ca_file, &p.url)
            && u.get_ref().starts_with("ws://")
        {
            cx.warning(
                file,
                Some(c.span()),
                "`ca_file` has no effect on a ws:// agent url (no TLS)",
            );
        }
        match (url, mode, auth, ca_file) {
            (Some(url), Some(mode), Some(auth), Some(ca_file)) => Some(AgentSettings {
                url,
                mode,
                auth,
                ca_file,
            }),
            _ => None,
        }
    } else {
        None
    };
    if !ok || !dg_ok {
        return None;
    }
    match (dg, ag, deepgram, agent) {
        (None, None, false, false) => Some(Pipeline::Echo),
        (Some(d), None, true, false) => Some(Pipeline::Deepgram(d)),
        (None, Some(a), false, true) => Some(Pipeline::Agent(a)),
        (Some(d), Some(a), true, true) => Some(Pipeline::DeepgramAgent(d, a)),
        _ => None,
    }
}

/// The failure-policy keys of a pipeline table. They govern the agent
/// connection, so they apply to `agent` and `deepgram+agent`: `echo` has no
/// network, and a `deepgram`-only pipeline reconnects by itself and never
/// ends the call.
fn check_failure_policy(cx: &mut Cx<'_>, file: usize, p: &RawPipeline) -> FailurePolicy {
    let mut policy = FailurePolicy::default();
    let kind = p.kind.get_ref().as_str();
    let network = kind == "agent" || kind == "deepgram+agent";
    let spans = [
        ("on_failure", p.on_failure.as_ref().map(Spanned::span)),
        (
            "fallback_prompt",
            p.fallback_prompt.as_ref().map(Spanned::span),
        ),
        (
            "reconnect_attempts",
            p.reconnect_attempts.as_ref().map(Spanned::span),
        ),
        (
            "reconnect_within_ms",
            p.reconnect_within_ms.as_ref().map(Spanned::span),
        ),
        (
            "connect_timeout_ms",
            p.connect_timeout_ms.as_ref().map(Spanned::span),
        ),
        (
            "agent_silence_s",
            p.agent_silence_s.as_ref().map(Spanned::span),
        ),
        ("away_audio", p.away_audio.as_ref().map(Spanned::span)),
        ("hold_prompt", p.hold_prompt.as_ref().map(Spanned::span)),
    ];
    if !network {
        for (name, span) in spans {
            if let Some(span) = span {
                cx.error(
                    file,
                    Some(span),
                    format!("`{name}` does not apply to pipeline kind `{kind}` (only to agents)"),
                );
            }
        }
        return policy;
    }
    if let Some(v) = &p.on_failure {
        match v.get_ref().as_str() {
            "fallback" => policy.on_failure = OnFailure::Fallback,
            "continue" => policy.on_failure = OnFailure::Continue,
            other => cx.error(
                file,
                Some(v.span()),
                format!("on_failure `{other}` must be `fallback` or `continue`"),
            ),
        }
    }
    let hold_prompt = p
        .hold_prompt
        .as_ref()
        .and_then(|written| check_prompt(cx, file, written));
    if let Some(v) = &p.away_audio {
        match v.get_ref().as_str() {
            "comfort-noise" => policy.away_audio = AwayAudio::ComfortNoise,
            "silence" => policy.away_audio = AwayAudio::Silence,
            "hold-prompt" if p.hold_prompt.is_none() => cx.error(
                file,
                Some(v.span()),
                "away_audio = \"hold-prompt\" needs `hold_prompt` (a WAV file)",
            ),
            "hold-prompt" => {}
            other => cx.error(
                file,
                Some(v.span()),
                format!("away_audio `{other}` must be `comfort-noise`, `silence` or `hold-prompt`"),
            ),
        }
    }
    if let Some(written) = &p.hold_prompt {
        let wanted = p
            .away_audio
            .as_ref()
            .is_none_or(|v| v.get_ref() == "hold-prompt");
        if !wanted {
            cx.error(
                file,
                Some(written.span()),
                "`hold_prompt` needs away_audio = \"hold-prompt\" (or no away_audio)",
            );
        } else if let Some(prompt) = hold_prompt {
            let max = u64::from(crate::media::prompt::MAX_PROMPT_SECONDS) * 1000;
            if prompt.duration_ms > max {
                cx.error(
                    file,
                    Some(written.span()),
                    format!(
                        "hold_prompt {}: {:.1} s; at most {} s",
                        prompt.path.display(),
                        prompt.duration_ms as f64 / 1000.0,
                        max / 1000
                    ),
                );
            } else {
                policy.away_audio = AwayAudio::HoldPrompt(prompt);
            }
        }
    }
    if let Some(written) = &p.fallback_prompt {
        if policy.on_failure == OnFailure::Continue {
            cx.error(
                file,
                Some(written.span()),
                "`fallback_prompt` needs on_failure = \"fallback\"",
            );
        } else if let Some(prompt) = check_prompt(cx, file, written) {
            if Duration::from_millis(prompt.duration_ms) > MAX_FALLBACK_PROMPT {
                cx.error(
                    file,
                    Some(written.span()),
                    format!(
                        "fallback_prompt {}: {:.1} s; at most {} s",
                        prompt.path.display(),
                        prompt.duration_ms as f64 / 1000.0,
                        MAX_FALLBACK_PROMPT.as_secs()
                    ),
                );
            } else {
                policy.fallback_prompt = Some(prompt);
            }
        }
    }
    let mut ranged = |v: &Option<Spanned<u32>>, what: &str, range: Range<u32>| -> Option<u32> {
        let v = v.as_ref()?;
        let n = *v.get_ref();
        if range.contains(&n) {
            Some(n)
        } else {
            cx.error(
                file,
                Some(v.span()),
                format!("{what} {n} must be {}-{}", range.start, range.end - 1),
            );
            None
        }
    };
    if let Some(n) = ranged(&p.reconnect_attempts, "reconnect_attempts", 0..11) {
        policy.reconnect_attempts = n;
    }
    if let Some(n) = ranged(&p.reconnect_within_ms, "reconnect_within_ms", 100..600_001) {
        policy.reconnect_within = Duration::from_millis(u64::from(n));
    }
    if let Some(n) = ranged(&p.connect_timeout_ms, "connect_timeout_ms", 100..30_001) {
        policy.connect_timeout = Duration::from_millis(u64::from(n));
    }
    if let Some(n) = ranged(&p.agent_silence_s, "agent_silence_s", 0..3601) {
        policy.agent_silence = (n > 0).then(|| Duration::from_secs(u64::from(n)));
    }
    policy
}

/// `auth = "<secret ref>"` (bearer) or `auth = { kind = "bearer" | "hmac",
/// secret = "<secret ref>" }`; any other key is an error.
fn check_agent_auth(
    cx: &mut Cx<'_>,
    file: usize,
    written: &Spanned<toml::Value>,
) -> Option<AgentAuth> {
    let span = written.span();
    let bad = |cx: &mut Cx<'_>, msg: String| {
        cx.error(file, Some(span.clone()), msg);
        None
    };
    let secret_at = |v: &str| Spanned::new(span.clone(), v.to_owned());
    match written.get_ref() {
        toml::Value::String(s) => cx
            .secret(file, &secret_at(s), "agent auth")
            .map(AgentAuth::Bearer),
        toml::Value::Table(t) => {
            if let Some(other) = t.keys().find(|k| !["kind", "secret"].contains(&k.as_str())) {
                return bad(
                    cx,
                    format!("unknown key `{other}` in agent auth, expected `kind` and `secret`"),
                );
            }
            let Some(toml::Value::String(secret)) = t.get("secret") else {
                return bad(
                    cx,
                    "agent auth needs `secret` (a secret reference)".to_owned(),
                );
            };
            let secret = secret_at(secret);
            match t.get("kind").and_then(toml::Value::as_str) {
                Some("bearer") => cx
                    .secret(file, &secret, "agent auth")
                    .map(AgentAuth::Bearer),
                Some("hmac") => cx.secret(file, &secret, "agent auth").map(AgentAuth::Hmac),
                Some(other) => bad(
                    cx,
                    format!("agent auth kind `{other}` must be `bearer` or `hmac`"),
                ),
                None => bad(
                    cx,
                    "agent auth needs `kind` (`bearer` or `hmac`)".to_owned(),
                ),
            }
        }
        _ => bad(
            cx,
            "agent auth must be a secret reference or { kind, secret }".to_owned(),
        ),
    }
}

/// Reads a PEM file of CA certificates: at least one, each one rustls accepts
/// as a trust anchor.
fn check_ca_file(cx: &mut Cx<'_>, file: usize, written: &Spanned<String>) -> Option<CaFile> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let path = PathBuf::from(written.get_ref());
    let mut fail = |why: String| {
        cx.error(
            file,
            Some(written.span()),
            format!("ca_file {}: {why}", path.display()),
        );
        None
    };
    let certs: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(&path) {
        Ok(iter) => match iter.collect::<Result<_, _>>() {
            Ok(certs) => certs,
            Err(e) => return fail(format!("not a PEM certificate file: {e}")),
        },
        Err(e) => return fail(format!("cannot read: {e}")),
    };
    if certs.is_empty() {
        return fail("holds no CERTIFICATE block".to_owned());
    }
    let mut roots = rustls::RootCertStore::empty();
    let (_, ignored) = roots.add_parsable_certificates(certs.iter().cloned());
    if ignored > 0 {
        return fail(format!(
            "{ignored} certificate(s) are not valid trust anchors"
        ));
    }
    Some(CaFile { path, certs })
}

fn check_routes(
    cx: &mut Cx<'_>,
    raw: Vec<Item<RawRoute>>,
    tenant_known: &dyn Fn(&str) -> bool,
    trunk_known: &dyn Fn(&str) -> bool,
    trunks: &[(Trunk, Loc)],
) -> Vec<Route> {
    let mut out: Vec<(Route, Loc)> = Vec::new();
    for Item {
        file,
        value: r,
        damaged: _,
    } in raw
    {
        let loc = (file, r.number.span());
        let number = match NumberPattern::parse(r.number.get_ref()) {
            Ok(n) => Some(n),
            Err(e) => {
                cx.error_at(&loc, e.to_string());
                None
            }
        };
        let tenant = r.tenant.get_ref();
        if !tenant_known(tenant) {
            cx.error(
                file,
                Some(r.tenant.span()),
                format!("route names unknown tenant `{tenant}`"),
            );
        }
        if let Some(list) = &r.trunks {
            if list.is_empty() {
                cx.error_at(
                    &loc,
                    "`trunks = []` matches no trunk: remove it to allow every trunk",
                );
            }
            for t in list {
                if !trunk_known(t.get_ref()) {
                    cx.error(
                        file,
                        Some(t.span()),
                        format!("route names unknown trunk `{}`", t.get_ref()),
                    );
                } else if let Some(owner) = trunks
                    .iter()
                    .find(|(x, _)| x.name == *t.get_ref())
                    .and_then(|(x, _)| x.tenant.as_deref())
                    .filter(|o| *o != tenant)
                {
                    cx.error(
                            file,
                            Some(t.span()),
                            format!(
                                "trunk `{}` is dedicated to tenant `{owner}`, so this route to `{tenant}` can never match",
                                t.get_ref()
                            ),
                        );
                }
            }
        }
        let Some(number) = number else { continue };
        let route = Route {
            number,
            tenant: tenant.clone(),
            trunks: r
                .trunks
                .as_ref()
                .map(|l| l.iter().map(|t| t.get_ref().clone()).collect()),
        };
        let overlap = out.iter().find(|(other, _)| {
            other.number == route.number
                && match (&other.trunks, &route.trunks) {
                    (Some(a), Some(b)) => a.iter().any(|x| b.contains(x)),
                    _ => true,
                }
        });
        if let Some((other, first)) = overlap {
            let msg = format!(
                "route {} overlaps the route at {} (same number, trunks in common, to tenant `{}`): the match would be ambiguous",
                route.number,
                cx.place(first),
                other.tenant
            );
            cx.error_at(&loc, msg);
            continue;
        }
        out.push((route, loc));
    }
    out.into_iter().map(|(r, _)| r).collect()
}
