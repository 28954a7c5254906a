//! Dialed-number patterns for routes and the normalisation of dialed numbers.
//!
//! Owns: the pattern syntax (`+15551230000` exact, `+1555*` prefix, `*` all)
//! and the matching rule. Must not know about tenants or trunks.
//!
//! Rule: a number is compared as its digits only. A leading `+` is optional
//! (both in patterns and in dialed numbers) and RFC 3966 visual separators
//! (`-`, `.`, `(`, `)`, space) in dialed numbers are ignored, so `+1 (555)
//! 123-0000`, `15551230000` and `+15551230000` are the same number. A dialed
//! number that still holds anything but digits (`*`, `#`, letters) matches no
//! route.

use std::fmt;

/// The most digits an E.164 number has.
pub const MAX_DIGITS: usize = 15;

/// A route's number: exact digits, or a digit prefix (possibly empty = every number).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NumberPattern {
    /// Matches exactly these digits.
    Exact(String),
    /// Matches any number starting with these digits.
    Prefix(String),
}

/// Why a route's `number` is not a pattern.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum NumberError {
    /// A character other than digits, a leading `+` and a trailing `*`.
    #[error(
        "`{0}` is not an E.164 number (`+15551230000`) or prefix (`+1555*`, `*`): only digits, a leading `+` and a trailing `*` are allowed"
    )]
    Syntax(String),
    /// More than 15 digits.
    #[error("`{0}` has more than 15 digits")]
    TooLong(String),
    /// No digits and no `*`.
    #[error("empty number")]
    Empty,
}

impl NumberPattern {
    /// Parses a pattern as written in a route.
    pub fn parse(written: &str) -> Result<NumberPattern, NumberError> {
        let body = written.strip_prefix('+').unwrap_or(written);
        let (digits, prefix) = match body.strip_suffix('*') {
            Some(d) => (d, true),
            None => (body, false),
        };
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(NumberError::Syntax(written.to_owned()));
        }
        if digits.len() > MAX_DIGITS {
            return Err(NumberError::TooLong(written.to_owned()));
        }
        if prefix {
            Ok(NumberPattern::Prefix(digits.to_owned()))
        } else if digits.is_empty() {
            Err(NumberError::Empty)
        } else {
            Ok(NumberPattern::Exact(digits.to_owned()))
        }
    }

    /// If the (normalised) number matches, how specifically: exact beats every
    /// prefix, a longer prefix beats a shorter one.
    pub fn specificity(&self, digits: &str) -> Option<usize> {
        match self {
            NumberPattern::Exact(d) if d == digits => Some(usize::MAX),
            NumberPattern::Prefix(p) if digits.starts_with(p.as_str()) => Some(p.len()),
            _ => None,
        }
    }
}

impl fmt::Display for NumberPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NumberPattern::Exact(d) => write!(f, "+{d}"),
            NumberPattern::Prefix(p) if p.is_empty() => f.write_str("*"),
            NumberPattern::Prefix(p) => write!(f, "+{p}*"),
        }
    }
}

/// The digits of a dialed number, or `None` if it is not a plain number.
pub fn normalise(dialed: &str) -> Option<String> {
    let trimmed = dialed.trim();
    let body = trimmed.strip_prefix('+').unwrap_or(trimmed);
    let mut digits = String::with_capacity(body.len().min(MAX_DIGITS + 1));
    for c in body.chars() {
        match c {
            '0'..='9' => digits.push(c),
            '-' | '.' | '(' | ')' | ' ' => {}
            _ => return None,
        }
        if digits.len() > MAX_DIGITS {
            return None;
        }
    }
    (!digits.is_empty()).then_some(digits)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn parses_patterns() {
        assert_eq!(
            NumberPattern::parse("+15551230000"),
            Ok(NumberPattern::Exact("15551230000".into()))
        );
        assert_eq!(
            NumberPattern::parse("+1555*"),
            Ok(NumberPattern::Prefix("1555".into()))
        );
        assert_eq!(
            NumberPattern::parse("*"),
            Ok(NumberPattern::Prefix(String::new()))
        );
        assert_eq!(
            NumberPattern::parse("100"),
            Ok(NumberPattern::Exact("100".into()))
        );
        assert!(matches!(
            NumberPattern::parse("+1 555"),
            Err(NumberError::Syntax(_))
        ));
        assert!(matches!(
            NumberPattern::parse("+1*5"),
            Err(NumberError::Syntax(_))
        ));
        assert!(matches!(
            NumberPattern::parse("+1234567890123456"),
            Err(NumberError::TooLong(_))
        ));
        assert_eq!(NumberPattern::parse("+"), Err(NumberError::Empty));
        assert_eq!(
            NumberPattern::parse("+1555*").unwrap().to_string(),
            "+1555*"
        );
        assert_eq!(NumberPattern::parse("*").unwrap().to_string(), "*");
    }

    #[test]
    fn normalises_dialed_numbers() {
        assert_eq!(
            normalise("+1 (555) 123-0000").as_deref(),
            Some("15551230000")
        );
        assert_eq!(normalise("1.555.123.0000").as_deref(), Some("15551230000"));
        assert_eq!(normalise("*21#"), None);
        assert_eq!(normalise("alice"), None);
        assert_eq!(normalise("+"), None);
        assert_eq!(normalise("1234567890123456"), None);
    }

    #[test]
    fn exact_beats_longer_prefix_beats_shorter() {
        let exact = NumberPattern::parse("+15551230000").unwrap();
        let long = NumberPattern::parse("+1555123*").unwrap();
        let short = NumberPattern::parse("+1*").unwrap();
        let all = NumberPattern::parse("*").unwrap();
        let n = "15551230000";
        let s: Vec<_> = [&exact, &long, &short, &all]
            .iter()
            .map(|p| p.specificity(n).unwrap())
            .collect();
        assert!(s[0] > s[1] && s[1] > s[2] && s[2] > s[3]);
        assert_eq!(exact.specificity("15551230001"), None);
        assert_eq!(long.specificity("1666"), None);
    }
}
