//! Process-wide logging with `tracing`: human text on a terminal, JSON lines
//! (one object per event) for journald and log collectors.
//!
//! Owns: building and installing the subscriber. Must not decide what is
//! logged; modules log through `tracing` macros and never format secret
//! values (config `Secret` prints only a fingerprint).
//!
//! Per-call context: later modules open one span per call,
//! `tracing::info_span!("call", call_id = %id)`, and enter it (or
//! `.instrument()` the call's task). Every event inside carries the span's
//! fields: in text as `call{call_id=…}:`, in JSON inside the `spans` list,
//! e.g. `"spans":[{"call_id":"a84b4c76e66710","name":"call"}]`, so
//! `grep '"call_id":"a84b4c76e66710"'` finds a whole call.

use std::io::IsTerminal as _;

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum LogFormat {
    /// Text when stderr is a terminal, JSON otherwise.
    Auto,
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Replaces `Auto` by `Text` or `Json` depending on whether the output is a terminal.
    pub fn resolve(self, is_terminal: bool) -> LogFormat {
        match self {
            LogFormat::Auto if is_terminal => LogFormat::Text,
            LogFormat::Auto => LogFormat::Json,
            other => other,
        }
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoggingError {
    /// The filter is not valid `RUST_LOG` syntax.
    #[error("invalid log filter `{filter}`: {reason}")]
    BadFilter {
        /// The filter as given.
        filter: String,
        /// The parser's complaint.
        reason: String,
    },
    /// A global subscriber was already installed.
    #[error("logging was already initialised")]
    AlreadySet,
}

/// The default filter when neither `--log-filter`, `SIPBRIDGE_LOG` nor `RUST_LOG` is set.
pub const DEFAULT_FILTER: &str = "info";

/// Builds a subscriber writing to `writer`. `filter` uses `RUST_LOG` syntax
/// (`info`, `sipbridge::sip=debug,warn`). `Auto` is treated as JSON; call
/// [`LogFormat::resolve`] first to choose by terminal. `ansi` colours text output.
pub fn subscriber<W>(
    format: LogFormat,
    filter: &str,
    writer: W,
    ansi: bool,
) -> Result<Box<dyn Subscriber + Send + Sync>, LoggingError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let env_filter = EnvFilter::builder()
        .parse(filter)
        .map_err(|e| LoggingError::BadFilter {
            filter: filter.to_owned(),
            reason: e.to_string(),
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(writer);
    Ok(match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Auto | LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(true)
                .finish(),
        ),
    })
}

/// Installs the global subscriber writing to stderr.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let terminal = std::io::stderr().is_terminal();
    let sub = subscriber(format.resolve(terminal), filter, std::io::stderr, terminal)?;
    tracing::subscriber::set_global_default(sub).map_err(|_| LoggingError::AlreadySet)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buf {
        type Writer = Buf;
        fn make_writer(&'w self) -> Buf {
            self.clone()
        }
    }

    fn lines(buf: &Buf) -> Vec<String> {
        String::from_utf8(buf.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn json_line_carries_call_id_from_the_call_span() {
        let buf = Buf::default();
        let sub = subscriber(LogFormat::Json, "info", buf.clone(), false).unwrap();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("call", call_id = %"a84b4c76e66710");
            let _g = span.enter();
            tracing::info!(status = 200, "answered");
        });
        let lines = lines(&buf);
        assert_eq!(lines.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["message"], "answered");
        assert_eq!(v["status"], 200);
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["spans"][0]["name"], "call");
        assert_eq!(v["spans"][0]["call_id"], "a84b4c76e66710");
        assert!(lines[0].contains(r#""call_id":"a84b4c76e66710""#));
    }

    #[test]
    fn text_line_shows_span_and_filter_applies() {
        let buf = Buf::default();
        let sub = subscriber(LogFormat::Text, "info", buf.clone(), false).unwrap();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("call", call_id = %"c1");
            let _g = span.enter();
            tracing::debug!("hidden");
            tracing::warn!("shown");
        });
        let lines = lines(&buf);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("call{call_id=c1}"), "{}", lines[0]);
        assert!(lines[0].ends_with("shown"));
    }

    #[test]
    fn auto_resolves_by_terminal_and_bad_filter_is_an_error() {
        assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Text);
        assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json);
        assert_eq!(LogFormat::Json.resolve(true), LogFormat::Json);
        let err = subscriber(LogFormat::Json, "sipbridge=loud", Buf::default(), false);
        assert!(matches!(err, Err(LoggingError::BadFilter { .. })));
    }
}
