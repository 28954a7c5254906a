//! Encryption at rest: the key hierarchy and the sealed file format.
//!
//! Owns: the master key, per-tenant data keys ([`keyring`]: wrapped under the
//! master key in `var_dir/keys/`, created on first use, destroyed to
//! crypto-shred a tenant) and the sealed chunk format ([`sealed`]: AES-256-GCM
//! chunks of at most one second of audio, ordered, bound to their file, the
//! last one marked final). Must not touch: what is inside the chunks (that is
//! `store::recording`), the metadata database, retention decisions, or the
//! configuration (the master key arrives as bytes).
//!
//! Key hierarchy:
//! - master key (32 bytes, from the configuration as a secret) → wraps
//! - one data key per tenant (32 random bytes from a cryptographic RNG), with a
//!   random [`KeyId`] that every sealed file names → derives
//! - one file key per sealed file: `HMAC-SHA256(data key, "sipbridge sbrec v1
//!   file key" || file id)`, i.e. HKDF-Expand with a single output block
//!   (RFC 5869 §2.3), written as one HMAC because `hmac` is already a
//!   dependency and one block is all we need.
//!
//! Why a file key: AES-GCM with 96-bit nonces is only safe while no nonce
//! repeats under one key. A per-file key from a random 128-bit file id makes
//! every file its own nonce space, so the chunk nonce can simply be a counter
//! (see [`sealed`]) and the number of files per tenant key does not matter.

pub mod keyring;
pub mod sealed;

use aes_gcm::{Aes256Gcm, KeyInit};
use hmac::{Hmac, Mac};
use rand::CryptoRng;
use sha2::Sha256;
use std::fmt;
use zeroize::Zeroizing;

pub use keyring::KeyRing;
pub use sealed::{HeaderMeta, Recovered, SealedHeader, SealedReader, SealedWriter, recover};

/// Length of every key in the hierarchy (AES-256).
pub const KEY_LEN: usize = 32;
/// Longest tenant name accepted (it becomes a path component).
pub const MAX_TENANT_LEN: usize = 64;

const FILE_KEY_LABEL: &[u8] = b"sipbridge sbrec v1 file key";
const MASTER_FINGERPRINT_LABEL: &[u8] = b"sipbridge master key fingerprint";

/// Everything that can go wrong with keys or sealed files. Each way a sealed
/// file can be damaged has its own variant, so an operator can tell a
/// truncated crash file from tampering.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The master key is not 32 bytes.
    #[error("master key must be {KEY_LEN} bytes, got {len}")]
    MasterKeyLength { len: usize },
    /// The tenant name cannot be used as a key or path name.
    #[error("invalid tenant name {0:?}: 1..=64 of [A-Za-z0-9_-], not starting with '-'")]
    InvalidTenant(String),
    /// No data key exists for this tenant (never created, or destroyed).
    #[error("no data key for tenant {tenant:?} (never created or destroyed)")]
    NoKey { tenant: String },
    /// The tenant's key file was wrapped by a different master key.
    #[error("key file of tenant {tenant:?} was wrapped by another master key")]
    MasterKeyMismatch { tenant: String },
    /// The key file is not in the wrapped-key format (wrong length, magic or version).
    #[error("key file of tenant {tenant:?} is malformed")]
    KeyFileMalformed { tenant: String },
    /// The wrapped key does not authenticate under the master key: the file
    /// was altered (or moved from another tenant's name).
    #[error("key file of tenant {tenant:?} failed authentication (tampered or renamed)")]
    KeyFileTampered { tenant: String },

    /// The file does not start with the sealed-file magic.
    #[error("not a sealed file (bad magic)")]
    BadMagic,
    /// A sealed-file version this build cannot read.
    #[error("unsupported sealed file version {0}")]
    UnsupportedVersion(u8),
    /// The file ends inside its header.
    #[error("sealed file truncated inside its header")]
    TruncatedHeader,
    /// The header does not authenticate under the data key it names.
    #[error("sealed file header failed authentication (tampered)")]
    HeaderTampered,
    /// The file belongs to another tenant than the key offered.
    #[error("sealed file belongs to tenant {file:?}, key is tenant {key:?}")]
    WrongTenant { file: String, key: String },
    /// The file was sealed with another data key of this tenant (for example
    /// one destroyed and re-created since).
    #[error("sealed file of tenant {tenant:?} needs key {file}, offered key {key}")]
    WrongKey {
        tenant: String,
        file: KeyId,
        key: KeyId,
    },
    /// A chunk's length field exceeds the format's cap (never allocated).
    #[error("chunk {index}: length {len} exceeds the cap")]
    ChunkTooLong { index: u64, len: u32 },
    /// The shared key table (PostgreSQL store) could not be read or written.
    #[error("key store: {0}")]
    KeyStore(String),
    /// The file ends inside a chunk.
    #[error("sealed file truncated inside chunk {index}")]
    TruncatedChunk { index: u64 },
    /// The file ends on a chunk boundary but its final chunk is missing.
    #[error("sealed file truncated after {chunks} chunks: final chunk missing")]
    MissingFinal { chunks: u64 },
    /// The chunk failed authentication: its bytes were altered.
    #[error("chunk {index} failed authentication (tampered)")]
    ChunkTampered { index: u64 },
    /// An authentic chunk of this file stands at the wrong position
    /// (reordered, duplicated or a chunk removed before it).
    #[error("chunk out of order: expected {expected}, found {found}")]
    ChunkOutOfOrder { expected: u64, found: u64 },
    /// The chunk at this position was sealed for another file.
    #[error("chunk {index} belongs to another sealed file")]
    ChunkFromOtherFile { index: u64 },
    /// Bytes follow the final chunk.
    #[error("data after the final chunk ({after_chunks} chunks)")]
    TrailingData { after_chunks: u64 },
    /// Caller misuse: a plaintext chunk larger than the format allows.
    #[error("plaintext chunk of {len} bytes exceeds the cap of {max}")]
    PlaintextTooLong { len: usize, max: usize },
    /// AES-GCM refused to encrypt (input beyond its limits; not reachable
    /// with the capped chunk sizes, kept so no error is swallowed).
    #[error("AES-GCM encryption failed")]
    SealFailed,
    /// Caller misuse: header metadata that cannot be encoded.
    #[error("header metadata invalid: {0}")]
    InvalidMeta(&'static str),
    /// The underlying file or stream failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = CryptoError> = std::result::Result<T, E>;

/// The master key: wraps every tenant's data key. Zeroed when dropped.
pub struct MasterKey {
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl MasterKey {
    /// The master key from its raw 32 bytes (as read from the configured secret).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| CryptoError::MasterKeyLength { len: bytes.len() })?;
        Ok(Self {
            key: Zeroizing::new(arr),
        })
    }

    /// A fresh master key from a cryptographic RNG (first start of a demo set-up).
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill_bytes(key.as_mut());
        Self { key }
    }

    /// The raw key, to be written into a 0600 key file by the configuration layer.
    pub fn expose_bytes(&self) -> &[u8; KEY_LEN] {
        &self.key
    }

    /// A non-secret 8-byte fingerprint (HMAC of a fixed label): stored beside
    /// every wrapped key so a rotation knows which master wrapped it, and safe
    /// to log.
    pub fn fingerprint(&self) -> [u8; 8] {
        let full = hmac_sha256(&self.key, &[MASTER_FINGERPRINT_LABEL]);
        let mut out = [0u8; 8];
        out.copy_from_slice(&full[..8]);
        out
    }

    pub(crate) fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&(*self.key).into())
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", hex::encode(self.fingerprint()))
    }
}

/// Identifies one data key of one tenant (random, not secret). Sealed files
/// name the key id they need; a destroyed-and-recreated tenant key has a new id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A random 128-bit identity for one sealed file; also its file name.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId(pub [u8; 16]);

impl FileId {
    /// A fresh id. It must never be reused under the same data key: the file
    /// key (and so every nonce) is derived from it.
    pub fn random(rng: &mut impl CryptoRng) -> Self {
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        Self(id)
    }

    /// Lower-case hex, 32 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileId({self})")
    }
}

/// One tenant's data key, unwrapped. Zeroed when dropped; never logged.
#[derive(Clone)]
pub struct DataKey {
    tenant: String,
    id: KeyId,
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl DataKey {
    pub(crate) fn new(tenant: String, id: KeyId, key: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self { tenant, id, key }
    }

    /// The tenant this key belongs to.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// This key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    pub(crate) fn raw(&self) -> &[u8; KEY_LEN] {
        &self.key
    }

    /// The AES-256-GCM cipher for one file (see the module doc).
    pub(crate) fn file_cipher(&self, file_id: &FileId) -> Aes256Gcm {
        let file_key = Zeroizing::new(hmac_sha256(&self.key, &[FILE_KEY_LABEL, &file_id.0]));
        Aes256Gcm::new(&(*file_key).into())
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("tenant", &self.tenant)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Checks a tenant name for use as a key-file and directory name.
pub fn validate_tenant(tenant: &str) -> Result<()> {
    let ok = !tenant.is_empty()
        && tenant.len() <= MAX_TENANT_LEN
        && !tenant.starts_with('-')
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CryptoError::InvalidTenant(tenant.to_owned()))
    }
}

fn hmac_sha256(key: &[u8; KEY_LEN], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC pads a 32-byte key with zeros to SHA-256's 64-byte block (RFC 2104
    // §2), so this is HMAC keyed with `key`, built without a fallible call.
    let mut block = Zeroizing::new([0u8; 64]);
    block[..KEY_LEN].copy_from_slice(key);
    let mut mac = Hmac::<Sha256>::new(&(*block).into());
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn master_key_length_is_checked() {
        assert!(matches!(
            MasterKey::from_bytes(&[0u8; 31]),
            Err(CryptoError::MasterKeyLength { len: 31 })
        ));
        assert!(MasterKey::from_bytes(&[7u8; 32]).is_ok());
    }

    #[test]
    fn fingerprint_depends_on_key_and_debug_hides_it() {
        let a = MasterKey::from_bytes(&[1u8; 32]).unwrap();
        let b = MasterKey::from_bytes(&[2u8; 32]).unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        let dbg = format!("{a:?}");
        assert_eq!(dbg, format!("MasterKey({})", hex::encode(a.fingerprint())));
    }

    #[test]
    fn hmac_padding_shortcut_matches_slice_constructor() {
        let key = [0x0bu8; 32];
        let ours = hmac_sha256(&key, &[b"Hi ", b"There"]);
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&key).unwrap();
        mac.update(b"Hi There");
        let theirs: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn file_keys_differ_per_file() {
        use aes_gcm::aead::Aead;
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let dk = DataKey::new("t".into(), KeyId([0; 8]), Zeroizing::new([9u8; 32]));
        let f1 = FileId::random(&mut rng);
        let f2 = FileId::random(&mut rng);
        let nonce = [0u8; 12].into();
        let c1 = dk.file_cipher(&f1).encrypt(&nonce, &b"x"[..]).unwrap();
        let c2 = dk.file_cipher(&f2).encrypt(&nonce, &b"x"[..]).unwrap();
        assert_ne!(c1, c2);
        assert!(dk.file_cipher(&f2).decrypt(&nonce, &c1[..]).is_err());
    }

    #[test]
    fn tenant_names() {
        for ok in ["acme", "a", "ACME_corp-2", &"x".repeat(64)] {
            assert!(validate_tenant(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(validate_tenant(bad), Err(CryptoError::InvalidTenant(_))),
                "{bad}"
            );
        }
    }
}
