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
//!
//! Caller data (issue 15): logs end up in journald and collectors that
//! `erase` cannot reach, so a caller's number, a hashed tenant's dialled
//! number, transcript text and SIP bodies are never logged as they are.
//! Log sites pass numbers through [`number`] (a masked form such as
//! `+1555•••88`) and free text that may hold them (errors, panics, admin API
//! error bodies) through [`scrub`]. `[profile.logging] caller_data = "full"`
//! turns both off for debugging; it is process-wide because the subscriber is.

use std::borrow::Cow;
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// What logs show of callers (`[profile.logging] caller_data`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallerData {
    /// Numbers masked, free text scrubbed (the default).
    #[default]
    Masked,
    /// Everything as it is: for debugging only.
    Full,
}

static FULL_CALLER_DATA: AtomicBool = AtomicBool::new(false);

/// Sets what logs show of callers from now on (start-up and reload).
pub fn set_caller_data(mode: CallerData) {
    FULL_CALLER_DATA.store(mode == CallerData::Full, Ordering::Relaxed);
}

/// Whether logs show caller data in full (`caller_data = "full"`).
pub fn caller_data_full() -> bool {
    FULL_CALLER_DATA.load(Ordering::Relaxed)
}

/// The masked form of a phone number or SIP user: its first five and last
/// two characters around `•••` (`+15559998888` → `+1555•••88`); shorter ones
/// (seven characters or fewer) show only `•••`.
pub fn mask_number(n: &str) -> String {
    let chars: Vec<char> = n.chars().collect();
    if chars.is_empty() {
        return String::new();
    }
    if chars.len() <= 8 {
        return "•••".to_owned();
    }
    let head: String = chars.iter().take(5).collect();
    let tail: String = chars.iter().skip(chars.len() - 2).collect();
    format!("{head}•••{tail}")
}

/// A caller's (or a hashed tenant's dialled) number as logs may show it:
/// masked unless `caller_data = "full"`.
pub fn number(n: &str) -> String {
    if caller_data_full() {
        n.to_owned()
    } else {
        mask_number(n)
    }
}

/// Runs of this many digits or more in free text are taken for phone numbers.
const SCRUB_DIGITS: usize = 7;

/// Free text (an error, a panic message, an admin API error body) with every
/// run of seven or more digits — optionally led by `+` and broken by spaces,
/// dashes or brackets as numbers are written — masked by
/// [`mask_number`]. Unchanged when `caller_data = "full"`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    if caller_data_full() {
        return Cow::Borrowed(text);
    }
    scrub_always(text)
}

fn scrub_always(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let starts = bytes[i].is_ascii_digit() || (bytes[i] == b'+' && i + 1 < bytes.len());
        if !starts {
            i += 1;
            continue;
        }
        // The longest stretch of digits and separators from here.
        let mut end = i + 1;
        let mut digits = usize::from(bytes[i].is_ascii_digit());
        let mut last_digit = if digits > 0 { i + 1 } else { i };
        while end < bytes.len() {
            let b = bytes[end];
            if b.is_ascii_digit() {
                digits += 1;
                last_digit = end + 1;
            } else if !matches!(b, b' ' | b'-' | b'(' | b')') {
                break;
            }
            end += 1;
        }
        if digits >= SCRUB_DIGITS {
            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
            o.push_str(&text[copied..i]);
            o.push_str(&mask_number(&text[i..last_digit]));
            copied = last_digit;
        }
        i = last_digit.max(i + 1);
    }
    match out {
        None => Cow::Borrowed(text),
        Some(mut o) => {
            o.push_str(&text[copied..]);
            Cow::Owned(o)
        }
    }
}

/// A string from the wire (Call-ID, From, User-Agent, a tag) as a log field:
/// control characters (escape sequences, NUL, CR/LF, DEL, C1) and the
/// backslash are written as Rust escapes (`\u{1b}`, `\\`), so a hostile
/// value can neither drive the terminal that shows the log nor forge lines.
/// Use as `call_id = %wire(&id)`.
pub fn wire(s: &str) -> Wire<'_> {
    Wire(s)
}

/// See [`wire`].
#[derive(Debug, Clone, Copy)]
pub struct Wire<'a>(&'a str);

impl std::fmt::Display for Wire<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            if c.is_control() || c == '\\' {
                for e in c.escape_default() {
                    f.write_char(e)?;
                }
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// JSON text (serde_json's, which escapes what JSON requires) with the
/// control characters JSON allows raw — DEL and C1, such as the one-byte
/// CSI `U+009B` — escaped as `\u00XX` too, so the JSON stays the same value
/// and no terminal acts on it.
pub fn json_terminal_safe(json: String) -> String {
    if !json.chars().any(char::is_control) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if c.is_control() {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Replaces the default panic hook (which prints the message as it is) by one
/// that logs the panic through `tracing`, its message [`scrub`]bed.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            %location,
            message = %scrub(&message),
            "panic"
        );
    }));
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
    fn numbers_are_masked_and_free_text_scrubbed() {
        assert_eq!(mask_number("+15559998888"), "+1555•••88");
        assert_eq!(mask_number("15559998888"), "15559•••88");
        assert_eq!(mask_number("1234"), "•••");
        assert_eq!(mask_number(""), "");
        assert_eq!(
            scrub_always("no call from +1 (555) 999-8888 today"),
            "no call from +1 (5•••88 today"
        );
        assert_eq!(
            scrub_always("body: invalid +15559998888"),
            "body: invalid +1555•••88"
        );
        // Short numbers (ports, counts, ids) stay.
        assert_eq!(
            scrub_always("limit 1000 at 127.0.0.1:5060"),
            "limit 1000 at 127.0.0.1:5060"
        );
        assert!(matches!(scrub_always("nothing here"), Cow::Borrowed(_)));
        assert_eq!(scrub_always("ÿ+"), "ÿ+");
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
