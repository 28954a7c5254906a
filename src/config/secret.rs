//! Secret values (API keys, digest passwords, the master key) and the
//! references that name them in configuration.
//!
//! Owns: parsing a reference (`env:NAME`, `file:PATH`, `credential:NAME` or an
//! inline value), resolving it to bytes, and the [`Secret`] type whose Debug,
//! Display and Serialize show only a fingerprint. Must not log, format or
//! store a secret's value anywhere; nothing outside this file sees the bytes
//! except through [`Secret::expose`].
//!
//! The bytes live in a `zeroize::Zeroizing` buffer so they are wiped on drop.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The environment variable systemd sets for `LoadCredential=`.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// Where a secret comes from, as written in the configuration.
///
/// The source names a place (a variable, a path), never the value, so it may be
/// shown in diagnostics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecretRef {
    /// `env:NAME`: the value of an environment variable.
    Env(String),
    /// `file:PATH`: the contents of a file (relative paths against the working directory).
    File(PathBuf),
    /// `credential:NAME`: the file `$CREDENTIALS_DIRECTORY/NAME` (systemd `LoadCredential=`).
    Credential(String),
    /// Anything else: the value itself, written in the configuration (discouraged).
    Inline,
}

impl SecretRef {
    /// Classifies a configuration string. Never fails: a string without a known
    /// prefix is an inline secret. Malformed references (`env:` with no name)
    /// are reported by [`resolve`].
    pub fn parse(written: &str) -> SecretRef {
        if let Some(name) = written.strip_prefix("env:") {
            SecretRef::Env(name.to_owned())
        } else if let Some(path) = written.strip_prefix("file:") {
            SecretRef::File(PathBuf::from(path))
        } else if let Some(name) = written.strip_prefix("credential:") {
            SecretRef::Credential(name.to_owned())
        } else {
            SecretRef::Inline
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "env:{name}"),
            SecretRef::File(path) => write!(f, "file:{}", path.display()),
            SecretRef::Credential(name) => write!(f, "credential:{name}"),
            SecretRef::Inline => f.write_str("inline"),
        }
    }
}

/// Why a secret reference could not be resolved. Messages never contain the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecretError {
    /// The secret is empty, or the reference has no name/path after its prefix.
    #[error("empty secret reference `{0}`")]
    EmptyReference(String),
    /// `env:NAME` but NAME is not set (or not valid UTF-8).
    #[error("environment variable `{0}` is not set")]
    EnvUnset(String),
    /// `file:` or `credential:` could not be read.
    #[error("cannot read secret file `{path}`: {reason}")]
    Unreadable {
        /// The file that failed.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// `credential:` used but systemd did not pass credentials.
    #[error(
        "`credential:{0}` needs $CREDENTIALS_DIRECTORY (set by systemd LoadCredential=), which is not set"
    )]
    NoCredentialsDirectory(String),
    /// `credential:` names must be plain file names.
    #[error("credential name `{0}` must be a plain file name (no `/`)")]
    BadCredentialName(String),
    /// The referenced variable or file exists but holds nothing.
    #[error("secret from `{0}` is empty")]
    EmptyValue(String),
}

/// A resolved secret value. Debug, Display and Serialize print only a masked
/// fingerprint (`sha256:` + the first 4 hex digits of its SHA-256).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    bytes: Zeroizing<Vec<u8>>,
    source: SecretRef,
}

impl Secret {
    /// Wraps bytes obtained elsewhere (e.g. a key the daemon just generated).
    pub fn new(bytes: Vec<u8>, source: SecretRef) -> Secret {
        Secret {
            bytes: Zeroizing::new(bytes),
            source,
        }
    }

    /// The secret's bytes. Call only where the value is actually used (a
    /// digest computation, an HTTP header), never to format or log it.
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }

    /// Where the value came from.
    pub fn source(&self) -> &SecretRef {
        &self.source
    }

    /// `sha256:` + the first 4 hex digits of the value's SHA-256, then `…`.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.bytes.as_slice());
        format!("sha256:{}…", hex::encode(&digest[..2]))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("source", &format_args!("{}", self.source))
            .field("fingerprint", &format_args!("{}", self.fingerprint()))
            .finish()
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.fingerprint())
    }
}

/// Resolves a configuration string to a secret.
///
/// `file:` and `credential:` values lose one trailing line ending (`\n` or
/// `\r\n`), because editors and `echo` add one; use [`resolve_raw_file`] for
/// binary keys.
///
/// `env` looks up environment variables ([`process_env`] for the real ones);
/// it is a parameter so tests need not mutate the process environment.
pub fn resolve(written: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, SecretError> {
    let reference = SecretRef::parse(written);
    let bytes = match &reference {
        SecretRef::Env(name) => {
            if name.is_empty() {
                return Err(SecretError::EmptyReference(written.to_owned()));
            }
            env(name)
                .ok_or_else(|| SecretError::EnvUnset(name.clone()))?
                .into_bytes()
        }
        SecretRef::File(path) => {
            if path.as_os_str().is_empty() {
                return Err(SecretError::EmptyReference(written.to_owned()));
            }
            trim_line_ending(read_file(path)?)
        }
        SecretRef::Credential(name) => trim_line_ending(read_file(&credential_path(name, env)?)?),
        SecretRef::Inline => written.as_bytes().to_vec(),
    };
    if bytes.is_empty() {
        return Err(match reference {
            SecretRef::Inline => SecretError::EmptyReference(String::new()),
            other => SecretError::EmptyValue(other.to_string()),
        });
    }
    Ok(Secret::new(bytes, reference))
}

/// Reads a `file:` path verbatim (no trimming), for binary key files.
pub fn resolve_raw_file(path: &Path) -> Result<Secret, SecretError> {
    let bytes = read_file(path)?;
    if bytes.is_empty() {
        return Err(SecretError::EmptyValue(format!("file:{}", path.display())));
    }
    Ok(Secret::new(bytes, SecretRef::File(path.to_owned())))
}

/// `$CREDENTIALS_DIRECTORY/NAME`, checking the name and the variable.
pub fn credential_path(
    name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PathBuf, SecretError> {
    if name.is_empty() {
        return Err(SecretError::EmptyReference("credential:".to_owned()));
    }
    if name.contains('/') || name == "." || name == ".." {
        return Err(SecretError::BadCredentialName(name.to_owned()));
    }
    let dir = env(CREDENTIALS_DIRECTORY)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| SecretError::NoCredentialsDirectory(name.to_owned()))?;
    Ok(PathBuf::from(dir).join(name))
}

/// Looks up a variable in the real process environment (UTF-8 values only).
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn read_file(path: &Path) -> Result<Vec<u8>, SecretError> {
    std::fs::read(path).map_err(|e| SecretError::Unreadable {
        path: path.to_owned(),
        reason: e.kind().to_string(),
    })
}

fn trim_line_ending(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn env_and_credential_use_the_given_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), b"s3cret\n").unwrap();
        let d = dir.path().to_str().unwrap().to_owned();
        let env = move |k: &str| match k {
            "K" => Some("v".to_owned()),
            CREDENTIALS_DIRECTORY => Some(d.clone()),
            _ => None,
        };
        assert_eq!(resolve("env:K", &env).unwrap().expose(), b"v");
        let c = resolve("credential:pw", &env).unwrap();
        assert_eq!(c.expose(), b"s3cret");
        assert_eq!(c.source(), &SecretRef::Credential("pw".into()));
        assert_eq!(
            resolve("credential:pw", &no_env),
            Err(SecretError::NoCredentialsDirectory("pw".into()))
        );
    }

    #[test]
    fn fingerprint_is_first_four_hex_of_sha256() {
        // SHA-256("abc") = ba7816bf...
        let s = Secret::new(b"abc".to_vec(), SecretRef::Inline);
        assert_eq!(s.fingerprint(), "sha256:ba78…");
        assert_eq!(s.to_string(), "sha256:ba78…");
        assert_eq!(
            format!("{s:?}"),
            "Secret { source: inline, fingerprint: sha256:ba78… }"
        );
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"sha256:ba78…\"");
    }

    #[test]
    fn classifies_references() {
        assert_eq!(SecretRef::parse("env:X"), SecretRef::Env("X".into()));
        assert_eq!(
            SecretRef::parse("file:a/b"),
            SecretRef::File(PathBuf::from("a/b"))
        );
        assert_eq!(
            SecretRef::parse("credential:k"),
            SecretRef::Credential("k".into())
        );
        assert_eq!(SecretRef::parse("hunter2"), SecretRef::Inline);
    }

    #[test]
    fn file_secret_loses_one_line_ending_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, b"value\n\n").unwrap();
        let s = resolve(&format!("file:{}", p.display()), &no_env).unwrap();
        assert_eq!(s.expose(), b"value\n");
        std::fs::write(&p, b"value\r\n").unwrap();
        let s = resolve(&format!("file:{}", p.display()), &no_env).unwrap();
        assert_eq!(s.expose(), b"value");
        let raw = resolve_raw_file(&p).unwrap();
        assert_eq!(raw.expose(), b"value\r\n");
    }

    #[test]
    fn errors_name_the_place_not_the_value() {
        assert_eq!(
            resolve("env:SIPBRIDGE_TEST_SURELY_UNSET_VAR", &no_env),
            Err(SecretError::EnvUnset(
                "SIPBRIDGE_TEST_SURELY_UNSET_VAR".into()
            ))
        );
        assert_eq!(
            resolve("env:", &no_env),
            Err(SecretError::EmptyReference("env:".into()))
        );
        assert!(matches!(
            resolve("file:/nonexistent/sipbridge/secret", &no_env),
            Err(SecretError::Unreadable { .. })
        ));
        assert_eq!(
            credential_path("../x", &no_env),
            Err(SecretError::BadCredentialName("../x".into()))
        );
        assert_eq!(
            resolve("", &no_env),
            Err(SecretError::EmptyReference(String::new()))
        );
    }
}
