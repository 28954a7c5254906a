//! Configuration problems with their place in the source: `file:line:column: message`.
//!
//! Owns: turning byte offsets (toml spans) into 1-based line and column
//! numbers, and the [`Diagnostics`] list that `load` returns. Must not decide
//! what is an error (that is `validate`'s job).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// How bad a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Severity {
    /// The configuration cannot be used.
    Error,
    /// Accepted, but an operator should know (inline secret, key to be generated).
    Warning,
}

/// One problem (or note) at a place in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The configuration file, as given (relative to the working directory if it was).
    pub file: PathBuf,
    /// 1-based line and column (in characters), when the problem has a place in the file.
    pub position: Option<(usize, usize)>,
    /// What is wrong, in words. Never contains a secret value.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        match self.severity {
            Severity::Error => write!(f, ": {}", self.message),
            Severity::Warning => write!(f, ": warning: {}", self.message),
        }
    }
}

/// Every problem found in one load, errors first in file/line order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
}

impl Diagnostics {
    /// All diagnostics, sorted by file, then line, then column.
    pub fn items(&self) -> &[Diagnostic] {
        &self.items
    }

    /// Only the errors.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Error)
    }

    /// Only the warnings.
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items
            .iter()
            .filter(|d| d.severity == Severity::Warning)
    }

    /// True when at least one error was found.
    pub fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }

    pub(crate) fn push(&mut self, d: Diagnostic) {
        if !self.items.contains(&d) {
            self.items.push(d);
        }
    }

    pub(crate) fn sort(&mut self) {
        self.items.sort_by(|a, b| {
            (&a.file, a.position, a.severity, &a.message)
                .cmp(&(&b.file, b.position, b.severity, &b.message))
        });
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.items {
            writeln!(f, "{d}")?;
        }
        let errors = self.errors().count();
        let warnings = self.warnings().count();
        write!(f, "{errors} error(s), {warnings} warning(s)")
    }
}

impl std::error::Error for Diagnostics {}

/// The text of one configuration file, for mapping spans to line:column.
#[derive(Clone, Debug)]
pub(crate) struct Source {
    pub(crate) path: PathBuf,
    pub(crate) text: String,
    line_starts: Vec<usize>,
}

impl Source {
    pub(crate) fn new(path: &Path, text: String) -> Source {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Source {
            path: path.to_owned(),
            text,
            line_starts,
        }
    }

    /// 1-based (line, column) of a byte offset; the column counts characters.
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts.get(line - 1).copied().unwrap_or(0);
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        (line, column)
    }

    pub(crate) fn diagnostic(
        &self,
        severity: Severity,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic {
            severity,
            file: self.path.clone(),
            position: span.map(|s| self.position(s.start)),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let s = Source::new(Path::new("a.toml"), "ab\nçd = 1\n\nx".to_owned());
        assert_eq!(s.position(0), (1, 1));
        assert_eq!(s.position(2), (1, 3));
        assert_eq!(s.position(3), (2, 1));
        // 'ç' is two bytes: 'd' at byte 5 is column 2.
        assert_eq!(s.position(5), (2, 2));
        assert_eq!(s.position(11), (3, 1));
        assert_eq!(s.position(12), (4, 1));
        assert_eq!(s.position(999), (4, 2));
    }

    #[test]
    fn display_is_file_line_column_message() {
        let s = Source::new(Path::new("p/x.toml"), "a\nbb = 1\n".to_owned());
        let d = s.diagnostic(Severity::Error, Some(3..4), "bad");
        assert_eq!(d.to_string(), "p/x.toml:2:2: bad");
        let w = s.diagnostic(Severity::Warning, None, "note");
        assert_eq!(w.to_string(), "p/x.toml: warning: note");
        let mut all = Diagnostics::default();
        all.push(d.clone());
        all.push(w);
        all.push(d);
        all.sort();
        assert_eq!(
            all.to_string(),
            "p/x.toml: warning: note\np/x.toml:2:2: bad\n1 error(s), 1 warning(s)"
        );
    }
}
