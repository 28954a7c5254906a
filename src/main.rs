//! The `sipbridge` command line: parses arguments, sets up logging, and runs
//! one subcommand. Owns no protocol logic; each subcommand calls into the
//! library. New subcommands are new `Command` variants.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sipbridge::config;
use sipbridge::logging::{self, LogFormat};

/// Exit code for an invalid configuration (distinct from 1, a runtime failure).
const EXIT_INVALID_CONFIG: u8 = 2;

/// The profile `check`, `run` and the data commands read without `--config`.
const DEFAULT_CONFIG: &str = "sip-profiles/default.toml";

/// What to do when a relative `--config` (the default one included) does not
/// exist: it is looked up from the working directory, so outside the
/// repository the default is not found.
fn config_hint(path: &Path) -> Option<String> {
    if path.is_absolute() || path.exists() {
        return None;
    }
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| "?".to_owned());
    let default = if path == Path::new(DEFAULT_CONFIG) {
        " (the default)"
    } else {
        ""
    };
    Some(format!(
        "hint: {}{default} is looked up relative to the working directory {cwd}; \
         pass --config PATH to a profile file (e.g. /etc/sipbridge/sipbridge.toml), \
         or run sipbridge from the repository (where sip-profiles/ is)",
        path.display()
    ))
}

#[derive(Debug, Parser)]
#[command(
    name = "sipbridge",
    version,
    about = "Answers phone calls (SIP/RTP) for AI voice agents",
    long_about = "sipbridge answers SIP calls from carriers (Twilio, Telnyx), PBXs and SBCs, plays a \
recording-disclosure prompt, and bridges the caller's audio to an AI pipeline (echo, Deepgram, \
an agent over WebSocket). Trunks, tenants and routes are configured in sip-profiles/ \
(see docs/configuration.md).",
    after_help = "Examples:\n  sipbridge run\n  sipbridge check\n  sipbridge check --config sip-profiles/examples/twilio.toml\n  sipbridge --log-format json --log-filter debug check --config sip-profiles/"
)]
struct Cli {
    /// Log format: `auto` is text when stderr is a terminal, JSON lines otherwise.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,

    /// Log filter in RUST_LOG syntax, e.g. `info` or `sipbridge::sip=debug,warn`.
    /// Falls back to $SIPBRIDGE_LOG, then $RUST_LOG, then `info`.
    #[arg(long, global = true, env = "SIPBRIDGE_LOG")]
    log_filter: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration, print a summary, exit 0 if it is usable
    /// and 2 (after listing every problem as file:line:column) if not.
    Check {
        /// A profile file, or a directory whose *.toml files are each a profile.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Run the daemon: answer calls on the profile's listeners. SIGHUP
    /// reloads the profile (live calls keep theirs); SIGTERM drains (new calls
    /// get 503, live calls get BYE after `drain_grace_s`); SIGINT or a second
    /// SIGTERM ends the calls with BYE at once.
    Run {
        /// The profile file to serve.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Stored recordings: list them, decrypt one to a WAV file.
    Recordings {
        #[command(subcommand)]
        command: data::RecordingsCommand,
    },
    /// Delete what has outlived each tenant's retention policy.
    Retention {
        #[command(subcommand)]
        command: data::RetentionCommand,
    },
    /// Erase a caller's, a call's or a tenant's recordings, transcripts and
    /// caller ids at once (audited).
    Erase(data::EraseArgs),
    /// Data portability: a caller's CDRs, transcripts and decrypted
    /// recordings into a new directory (audited).
    Export(data::ExportArgs),
    /// Print a new admin API bearer token and the SHA-256 to configure for
    /// it (`admin_token_sha256` of a tenant). The token is shown only here.
    AdminToken {
        /// The tenant the token is for (only labels the printed line).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Tenant administration.
    Tenant {
        #[command(subcommand)]
        command: data::TenantCommand,
    },
    /// Place an outbound call through a running daemon's admin API
    /// (`POST /v1/calls`, plain HTTP) and print its answer: for testing.
    Dial(DialArgs),
}

/// `sipbridge dial`.
#[derive(Debug, clap::Args)]
struct DialArgs {
    /// The admin API's base URL (`http://host:port`).
    #[arg(long, env = "SIPBRIDGE_API", default_value = "http://127.0.0.1:8089")]
    api: String,
    /// The tenant's admin API bearer token.
    #[arg(long, env = "SIPBRIDGE_TOKEN", hide_env_values = true)]
    token: String,
    /// Whom to call: +15551234567, tel:+1… or a sip: URI.
    #[arg(long)]
    to: String,
    /// Our number (From).
    #[arg(long)]
    from: String,
    /// The trunk to dial through (one with [trunk.outbound]).
    #[arg(long)]
    trunk: String,
    /// A parameter for the agent's `start` message, `name=value` (repeatable).
    #[arg(long = "custom", value_name = "NAME=VALUE")]
    custom: Vec<String>,
    /// Ringing time before the call is cancelled, seconds.
    #[arg(long)]
    answer_timeout_s: Option<u32>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = cli
        .log_filter
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| logging::DEFAULT_FILTER.to_owned());
    if let Err(e) = logging::init(cli.log_format, &filter) {
        eprintln!("sipbridge: {e:#}");
        return ExitCode::FAILURE;
    }
    logging::install_panic_hook();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config),
        Command::Recordings { command } => data::recordings(command),
        Command::Retention { command } => data::retention(command),
        Command::Erase(args) => data::erase(args),
        Command::Export(args) => data::export(args),
        Command::Tenant { command } => data::tenant(command),
        Command::AdminToken { tenant } => admin_token(tenant.as_deref()),
        Command::Dial(args) => dial(&args),
    }
}

/// `sipbridge dial`: one HTTP/1.1 request to the admin API; prints the
/// status line and the JSON body; exit 0 on 201.
fn dial(args: &DialArgs) -> ExitCode {
    use std::io::{Read, Write};
    let mut custom = serde_json::Map::new();
    for kv in &args.custom {
        let Some((k, v)) = kv.split_once('=') else {
            eprintln!("sipbridge dial: --custom takes NAME=VALUE, got `{kv}`");
            return ExitCode::from(2);
        };
        custom.insert(k.to_owned(), v.into());
    }
    let mut body = serde_json::json!({
        "to": args.to, "from": args.from, "trunk": args.trunk, "custom": custom,
    });
    if let Some(t) = args.answer_timeout_s {
        body["answer_timeout_s"] = t.into();
    }
    let Some(rest) = args.api.strip_prefix("http://") else {
        eprintln!("sipbridge dial: --api must be an http:// URL");
        return ExitCode::from(2);
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let body = body.to_string();
    let request = format!(
        "POST /v1/calls HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        args.token,
        body.len()
    );
    let result = (|| -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(authority)?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(15)))?;
        stream.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        stream.take(1 << 20).read_to_end(&mut answer)?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    })();
    let answer = match result {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sipbridge dial: {}: {e}", args.api);
            return ExitCode::FAILURE;
        }
    };
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status_line = head.lines().next().unwrap_or_default();
    println!("{status_line}");
    println!("{}", body.trim());
    if status_line.split_whitespace().nth(1) == Some("201") {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn admin_token(tenant: Option<&str>) -> ExitCode {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let (token, hash) = sipbridge::admin::new_token(&mut rng);
    let table = tenant.map_or(String::new(), |t| format!("  # [[tenant]] id = \"{t}\""));
    println!("token: {token}");
    println!("admin_token_sha256 = \"{hash}\"{table}");
    ExitCode::SUCCESS
}

fn run(path: &Path) -> ExitCode {
    let cfg = match config::load(path) {
        Ok(cfg) => cfg,
        Err(diags) => {
            for d in diags.items() {
                tracing::error!(diagnostic = %d, "configuration invalid");
                eprintln!("{d}");
            }
            if let Some(hint) = config_hint(path) {
                eprintln!("{hint}");
            }
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    for w in &cfg.warnings {
        tracing::warn!(diagnostic = %w, "configuration warning");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sipbridge::daemon::run(
        std::sync::Arc::new(cfg),
        path.to_path_buf(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "daemon failed");
            eprintln!("sipbridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &Path) -> ExitCode {
    tracing::debug!(config = %path.display(), "checking configuration");
    match config::load(path) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                println!("{w}");
            }
            println!("configuration {} is valid", path.display());
            print!("{}", cfg.summary());
            ExitCode::SUCCESS
        }
        Err(diags) => {
            let color = std::io::stderr().is_terminal();
            for d in diags.items() {
                eprintln!("{d}");
            }
            if let Some(hint) = config_hint(path) {
                eprintln!("{hint}");
            }
            let errors = diags.errors().count();
            let summary = format!(
                "configuration {} is invalid: {errors} error(s)",
                path.display()
            );
            if color {
                eprintln!("\x1b[1;31m{summary}\x1b[0m");
            } else {
                eprintln!("{summary}");
            }
            ExitCode::from(EXIT_INVALID_CONFIG)
        }
    }
}

/// The data subcommands: argument parsing and printing around
/// `sipbridge::store::ops`, which holds their logic.
mod data {
    use sipbridge::store::db::CallerIdPolicy;
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;
    use std::time::SystemTime;

    use clap::{Args, Subcommand};
    use sipbridge::config::{self, Config, MasterKey, secret};
    use sipbridge::store::db::{UnixMs, unix_ms};
    use sipbridge::store::ops::{self, DataStore, EraseTarget, OpsError};
    use sipbridge::store::retention::RetentionPolicy;

    use super::EXIT_INVALID_CONFIG;

    /// The profile whose data a command works on.
    #[derive(Debug, Args)]
    pub(super) struct ConfigArg {
        /// The profile file (exactly one profile): its var_dir and master key.
        #[arg(long, short, default_value = super::DEFAULT_CONFIG)]
        config: PathBuf,
    }

    #[derive(Debug, Subcommand)]
    pub(super) enum RecordingsCommand {
        /// List recordings that still have a file (never shows caller numbers).
        List {
            #[command(flatten)]
            config: ConfigArg,
            /// Only this tenant.
            #[arg(long)]
            tenant: Option<String>,
            /// Only recordings created at or after this time: RFC 3339
            /// (2025-10-09T08:00:00Z), a date (2025-10-09) or unix seconds.
            #[arg(long)]
            since: Option<String>,
        },
        /// Decrypt one recording into a new WAV file (mode 0600; audited).
        Export {
            #[command(flatten)]
            config: ConfigArg,
            /// Recording id (see `recordings list`).
            id: String,
            /// The WAV file to create (must not exist).
            #[arg(long)]
            out: PathBuf,
        },
    }

    #[derive(Debug, Subcommand)]
    pub(super) enum RetentionCommand {
        /// Delete every expired item (files, then rows; each audited) and
        /// print it with the policy that expired it.
        Run {
            #[command(flatten)]
            config: ConfigArg,
            /// Print what would be deleted; delete nothing.
            #[arg(long)]
            dry_run: bool,
        },
    }

    #[derive(Debug, Args)]
    #[command(group(clap::ArgGroup::new("target").required(true).args(["caller", "call", "all"])))]
    pub(super) struct EraseArgs {
        #[command(flatten)]
        config: ConfigArg,
        /// The tenant whose data is erased (no other tenant is touched).
        #[arg(long)]
        tenant: String,
        /// Every call from this caller number.
        #[arg(long)]
        caller: Option<String>,
        /// One call (SIP Call-ID).
        #[arg(long)]
        call: Option<String>,
        /// Every call, recording and transcript of the tenant (its key stays).
        #[arg(long)]
        all: bool,
        /// Why (written to the audit log).
        #[arg(long)]
        reason: String,
    }

    #[derive(Debug, Args)]
    pub(super) struct ExportArgs {
        #[command(flatten)]
        config: ConfigArg,
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The caller number whose data is exported.
        #[arg(long)]
        caller: String,
        /// The directory to create (0700; must not exist).
        #[arg(long)]
        out: PathBuf,
    }

    #[derive(Debug, Subcommand)]
    pub(super) enum TenantCommand {
        /// Crypto-shred a tenant: destroy its data key, then its files and rows.
        Delete {
            #[command(flatten)]
            config: ConfigArg,
            /// The tenant.
            tenant: String,
            /// Confirm: this cannot be undone.
            #[arg(long)]
            yes: bool,
            /// Why (written to the audit log).
            #[arg(long, default_value = "tenant deleted by operator")]
            reason: String,
        },
    }

    /// A failure and the exit code it maps to.
    struct Failure {
        code: u8,
        message: String,
    }

    impl From<OpsError> for Failure {
        fn from(e: OpsError) -> Self {
            Self {
                code: 1,
                message: e.to_string(),
            }
        }
    }

    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_INVALID_CONFIG,
            message: message.into(),
        }
    }

    fn finish(result: Result<String, Failure>) -> ExitCode {
        match result {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(f) => {
                tracing::debug!(message = %f.message, "command failed");
                eprintln!("sipbridge: {}", f.message);
                ExitCode::from(f.code)
            }
        }
    }

    fn now() -> UnixMs {
        unix_ms(SystemTime::now())
    }

    /// The loaded configuration and its single profile's store.
    struct Opened {
        cfg: Config,
        ds: DataStore,
    }

    fn open(arg: &ConfigArg) -> Result<Opened, Failure> {
        let cfg = config::load_for_data(&arg.config).map_err(|diags| {
            let mut lines: Vec<String> = diags.items().iter().map(ToString::to_string).collect();
            lines.extend(super::config_hint(&arg.config));
            usage(format!(
                "configuration {} is invalid:\n{}",
                arg.config.display(),
                lines.join("\n")
            ))
        })?;
        let [profile] = cfg.profiles.as_slice() else {
            return Err(usage(format!(
                "{} holds {} profiles; give one profile file",
                arg.config.display(),
                cfg.profiles.len()
            )));
        };
        let master = match &profile.master_key {
            MasterKey::Loaded(s) => s.expose().to_vec(),
            MasterKey::ToGenerate(path) if path.is_file() => secret::resolve_raw_file(path)
                .map_err(|e| usage(format!("master key: {e}")))?
                .expose()
                .to_vec(),
            MasterKey::ToGenerate(path) => {
                return Err(Failure {
                    code: 1,
                    message: format!(
                        "master key {} does not exist yet: there is no stored data \
                         (the daemon generates it on first start)",
                        path.display()
                    ),
                });
            }
            _ => return Err(usage("master key: unsupported source")),
        };
        let master = zeroize::Zeroizing::new(master);
        let policies = cfg
            .tenants
            .iter()
            .map(|t| {
                let policy = CallerIdPolicy::for_tenant(t.hash_caller_numbers, &master, &t.id);
                (t.id.clone(), policy)
            })
            .collect();
        let mut ds =
            DataStore::open_engine(&profile.var_dir, &profile.store.engine, &master, policies)?;
        match sipbridge::store::objects::RecordingObjects::for_config(&profile.recordings) {
            Ok(objects) => ds.set_objects(objects),
            Err(e) => return Err(usage(format!("[profile.recordings]: {e}"))),
        }
        Ok(Opened { cfg, ds })
    }

    pub(super) fn recordings(command: RecordingsCommand) -> ExitCode {
        finish(match command {
            RecordingsCommand::List {
                config,
                tenant,
                since,
            } => list(&config, tenant.as_deref(), since.as_deref()),
            RecordingsCommand::Export { config, id, out } => export_recording(&config, &id, &out),
        })
    }

    fn list(arg: &ConfigArg, tenant: Option<&str>, since: Option<&str>) -> Result<String, Failure> {
        let since = since
            .map(|s| {
                ops::parse_since(s).ok_or_else(|| {
                    usage(format!(
                        "--since {s:?}: expected RFC 3339 (2025-10-09T08:00:00Z), a date \
                         (2025-10-09) or unix seconds"
                    ))
                })
            })
            .transpose()?;
        let o = open(arg)?;
        let recs =
            o.ds.store
                .list_recordings(tenant, since)
                .map_err(OpsError::from)?;
        Ok(ops::recordings_table(&recs))
    }

    fn export_recording(arg: &ConfigArg, id: &str, out: &Path) -> Result<String, Failure> {
        let mut o = open(arg)?;
        let frames = ops::export_recording(&mut o.ds, id, out, now())?;
        Ok(format!(
            "recording {id}: {frames} frames ({}.{:03} s) written to {}\n",
            frames / 8000,
            frames % 8000 / 8,
            out.display()
        ))
    }

    pub(super) fn retention(command: RetentionCommand) -> ExitCode {
        let RetentionCommand::Run { config, dry_run } = command;
        finish((|| {
            let mut o = open(&config)?;
            let at = now();
            let policy = {
                let cfg = &o.cfg;
                move |tenant: &str| {
                    cfg.tenant(tenant)
                        .map(|t| RetentionPolicy::from(&t.retention))
                }
            };
            let outcome = ops::run_retention(&mut o.ds, &policy, at, dry_run)?;
            let text = outcome.render(at);
            if outcome.has_failures() {
                print!("{text}");
                return Err(Failure {
                    code: 1,
                    message: "some files could not be deleted (see above)".into(),
                });
            }
            Ok(text)
        })())
    }

    pub(super) fn erase(args: EraseArgs) -> ExitCode {
        let target = match (args.caller, args.call, args.all) {
            (Some(n), None, false) => EraseTarget::Caller(n),
            (None, Some(c), false) => EraseTarget::Call(c),
            (None, None, true) => EraseTarget::All,
            _ => return finish(Err(usage("give one of --caller, --call, --all"))),
        };
        finish((|| {
            if args.reason.trim().is_empty() {
                return Err(usage("--reason must not be empty"));
            }
            let mut o = open(&args.config)?;
            let s = ops::erase(
                &mut o.ds,
                &args.tenant,
                &target,
                ops::CLI_ACTOR,
                &args.reason,
                now(),
            )?;
            Ok(ops::erase_summary(&s))
        })())
    }

    pub(super) fn export(args: ExportArgs) -> ExitCode {
        finish((|| {
            let mut o = open(&args.config)?;
            let r = ops::export_caller(&mut o.ds, &args.tenant, &args.caller, &args.out, now())?;
            let mut text = format!(
                "exported {} call(s), {} transcript segment(s), {} recording(s) to {}\n",
                r.calls,
                r.transcripts,
                r.recordings.len(),
                args.out.display()
            );
            for id in &r.still_recording {
                text.push_str(&format!("not exported (still recording): {id}\n"));
            }
            Ok(text)
        })())
    }

    pub(super) fn tenant(command: TenantCommand) -> ExitCode {
        let TenantCommand::Delete {
            config,
            tenant,
            yes,
            reason,
        } = command;
        finish((|| {
            if !yes {
                return Err(usage(format!(
                    "tenant delete destroys {tenant:?}'s data key and every recording, \
                     transcript and CDR of it; add --yes to confirm"
                )));
            }
            let mut o = open(&config)?;
            let r = ops::delete_tenant(&mut o.ds, &tenant, &reason, now())?;
            Ok(ops::tenant_delete_summary(&tenant, &r))
        })())
    }
}
