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
        #[arg(long, short, default_value = "sip-profiles/default.toml")]
        config: PathBuf,
    },
    /// Run the daemon: answer calls on the profile's listeners until SIGINT or
    /// SIGTERM (calls are then ended with BYE).
    Run {
        /// The profile file to serve.
        #[arg(long, short, default_value = "sip-profiles/default.toml")]
        config: PathBuf,
    },
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
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config),
    }
}

fn run(path: &Path) -> ExitCode {
    let cfg = match config::load(path) {
        Ok(cfg) => cfg,
        Err(diags) => {
            for d in diags.items() {
                tracing::error!(diagnostic = %d, "configuration invalid");
                eprintln!("{d}");
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
    match runtime.block_on(sipbridge::daemon::run(std::sync::Arc::new(cfg))) {
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
