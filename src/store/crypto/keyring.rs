//! Per-tenant data keys, stored wrapped by the master key in `var_dir/keys/`.
//!
//! Owns the `keys/` directory (0700) and its files `<tenant>.key` (0600).
//! Must not touch sealed files or anything else under `var_dir`.
//!
//! Wrapping is AES-256-GCM under the master key with a random 96-bit nonce
//! and the tenant name, key id and master fingerprint as associated data, so
//! a key file renamed to another tenant, or altered in any byte, fails to
//! unwrap. (AES-KW, RFC 3394, would also do; GCM is chosen because the crate
//! is already here and the random nonce costs 12 bytes per tenant. The master
//! key wraps one key per tenant plus one per rotation, far below GCM's
//! random-nonce limit.)
//!
//! Key file, 85 bytes: `"SBKEY\0\r\n"` · version `1` · master fingerprint (8)
//! · key id (8) · nonce (12) · wrapped key (32) · tag (16).
//!
//! Writes are atomic: the key is written to `.tmp-<tenant>.<random>` in the
//! same directory (0600, wrapped material only), synced, then hard-linked to
//! `<tenant>.key` (fails if the key appeared meanwhile: two creators never
//! overwrite each other's key) or renamed over it (rotation), and the
//! directory is synced. [`KeyRing::destroy`] overwrites the key file with
//! zeros before unlinking it, and removes any leftover temporary file of that
//! tenant. Overwriting in place is best effort on copy-on-write or flash
//! storage; the guarantee that survives is that without the wrapped key no
//! copy of a sealed file decrypts, so backups of `var_dir/keys` must be kept
//! apart from backups of the recordings (or not kept at all).

use super::{CryptoError, DataKey, KEY_LEN, KeyId, MasterKey, Result, validate_tenant};
use crate::store::db::conn::{Conn, vals};
use crate::store::db::schema;
use aes_gcm::aead::AeadInOut;
use rand::CryptoRng;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

const MAGIC: &[u8; 8] = b"SBKEY\0\r\n";
const VERSION: u8 = 1;
const FP_AT: usize = 9;
const ID_AT: usize = FP_AT + 8;
const NONCE_AT: usize = ID_AT + 8;
const CT_AT: usize = NONCE_AT + 12;
/// Total length of a key file.
pub const KEY_FILE_LEN: usize = CT_AT + KEY_LEN + 16;

/// The tenants' wrapped data keys in one directory. Holds no unwrapped key:
/// every call reads the file, so a key destroyed by another process (the
/// CLI) is gone for this one too.
///
/// With the PostgreSQL store (`[profile.store] kind = "postgres"`) the
/// wrapped keys live in its `data_keys` table instead of `keys/`, with the
/// same 85 bytes per tenant: every daemon sharing the database reads the
/// same key (each needs the same master key), and a key destroyed by one is
/// gone for all.
#[derive(Debug)]
pub struct KeyRing {
    dir: PathBuf,
    master: MasterKey,
    shared: Option<std::sync::Mutex<Conn>>,
}

fn key_store(e: impl std::fmt::Display) -> CryptoError {
    CryptoError::KeyStore(e.to_string())
}

impl KeyRing {
    /// The key ring under `var_dir/keys` (created 0700 if absent), with the
    /// master key's raw bytes.
    pub fn open(var_dir: &Path, master_key: &[u8]) -> Result<Self> {
        let master = MasterKey::from_bytes(master_key)?;
        let dir = var_dir.join("keys");
        DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        Ok(Self {
            dir,
            master,
            shared: None,
        })
    }

    /// The key ring of the store `engine` names: `var_dir/keys` for SQLite,
    /// the `data_keys` table for PostgreSQL (its own connection; the schema
    /// is migrated if this opens first).
    pub fn open_engine(
        var_dir: &Path,
        master_key: &[u8],
        engine: &crate::config::StoreEngine,
    ) -> Result<Self> {
        let mut ring = Self::open(var_dir, master_key)?;
        if let crate::config::StoreEngine::Postgres { url } = engine {
            let url = std::str::from_utf8(url.expose()).map_err(key_store)?;
            let conn = Conn::connect_postgres(url.trim()).map_err(key_store)?;
            schema::migrate(&conn).map_err(key_store)?;
            ring.shared = Some(std::sync::Mutex::new(conn));
        }
        Ok(ring)
    }

    fn shared(&self) -> Option<std::sync::MutexGuard<'_, Conn>> {
        self.shared
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The wrapped bytes of `tenant`'s key in the shared table, if any.
    fn shared_wrapped(conn: &Conn, tenant: &str) -> Result<Option<Zeroizing<Vec<u8>>>> {
        conn.query_row(
            "SELECT wrapped FROM data_keys WHERE tenant = ?1",
            &vals![tenant],
            |r| r.get::<Vec<u8>>(0),
        )
        .map(|v| v.map(Zeroizing::new))
        .map_err(key_store)
    }

    /// The `keys/` directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The master key's fingerprint (safe to log).
    pub fn master_fingerprint(&self) -> [u8; 8] {
        self.master.fingerprint()
    }

    /// The tenant's data key, created (random, wrapped, written) if absent.
    pub fn data_key(&self, tenant: &str, rng: &mut impl CryptoRng) -> Result<DataKey> {
        match self.load(tenant) {
            Err(CryptoError::NoKey { .. }) => {}
            other => return other,
        }
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill_bytes(raw.as_mut());
        let mut id = [0u8; 8];
        rng.fill_bytes(&mut id);
        let key = DataKey::new(tenant.to_owned(), KeyId(id), raw);
        let bytes = wrap(&self.master, &key, rng)?;
        if let Some(conn) = self.shared() {
            // Another daemon creating the same tenant's key at once: the
            // first insert wins and both use its key.
            conn.execute(
                "INSERT INTO data_keys (tenant, wrapped) VALUES (?1, ?2) \
                 ON CONFLICT (tenant) DO NOTHING",
                &vals![tenant, bytes],
            )
            .map_err(key_store)?;
            drop(conn);
            return self.load(tenant);
        }
        let tmp = self.write_temp(tenant, &bytes, rng)?;
        let linked = fs::hard_link(&tmp, self.key_path(tenant));
        fs::remove_file(&tmp)?;
        match linked {
            Ok(()) => {
                sync_dir(&self.dir)?;
                Ok(key)
            }
            // Another creator won the race: use its key, never overwrite it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => self.load(tenant),
            Err(e) => Err(e.into()),
        }
    }

    /// The tenant's existing data key; [`CryptoError::NoKey`] if there is none.
    pub fn load(&self, tenant: &str) -> Result<DataKey> {
        validate_tenant(tenant)?;
        if let Some(conn) = self.shared() {
            return match Self::shared_wrapped(&conn, tenant)? {
                Some(bytes) => unwrap(&self.master, tenant, &bytes),
                None => Err(CryptoError::NoKey {
                    tenant: tenant.to_owned(),
                }),
            };
        }
        let file = match File::open(self.key_path(tenant)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CryptoError::NoKey {
                    tenant: tenant.to_owned(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let mut bytes = Zeroizing::new(Vec::with_capacity(KEY_FILE_LEN + 1));
        file.take(KEY_FILE_LEN as u64 + 1).read_to_end(&mut bytes)?;
        unwrap(&self.master, tenant, &bytes)
    }

    /// Crypto-shreds the tenant: overwrites its key file with zeros, syncs,
    /// unlinks it (and any leftover temporary file of it). Returns whether a
    /// key existed. Afterwards no sealed file of this tenant decrypts.
    pub fn destroy(&self, tenant: &str) -> Result<bool> {
        validate_tenant(tenant)?;
        if let Some(conn) = self.shared() {
            let n = conn
                .execute("DELETE FROM data_keys WHERE tenant = ?1", &vals![tenant])
                .map_err(key_store)?;
            // Reclaims the dead row's space now rather than at autovacuum's
            // leisure (best effort: the row is already unreadable).
            let _ = conn.batch("VACUUM data_keys");
            return Ok(n > 0);
        }
        let existed = shred(&self.key_path(tenant))?;
        let prefix = format!(".tmp-{tenant}.");
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                shred(&entry.path())?;
            }
        }
        sync_dir(&self.dir)?;
        Ok(existed)
    }

    /// The tenants that have a key file, sorted.
    pub fn tenants(&self) -> Result<Vec<String>> {
        if let Some(conn) = self.shared() {
            return conn
                .query_map("SELECT tenant FROM data_keys ORDER BY tenant", &[], |r| {
                    r.get(0)
                })
                .map_err(key_store);
        }
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(t) = name.strip_suffix(".key")
                && validate_tenant(t).is_ok()
            {
                out.push(t.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Master-key rotation: re-wraps every tenant's key under `new_master`
    /// (key ids and data keys unchanged, so sealed files stay readable), each
    /// file replaced atomically, then uses the new master. Files already
    /// wrapped by the new master are skipped, so an interrupted rotation can
    /// simply be run again. Returns how many files were re-wrapped.
    pub fn rewrap(&mut self, new_master: &[u8], rng: &mut impl CryptoRng) -> Result<usize> {
        let new_master = MasterKey::from_bytes(new_master)?;
        let new_fp = new_master.fingerprint();
        let mut count = 0;
        if self.shared.is_some() {
            for tenant in self.tenants()? {
                let conn = self
                    .shared()
                    .ok_or(CryptoError::KeyStore("closed".into()))?;
                let tx = conn.begin().map_err(key_store)?;
                let Some(bytes) = tx
                    .query_row(
                        "SELECT wrapped FROM data_keys WHERE tenant = ?1 FOR UPDATE",
                        &vals![tenant],
                        |r| r.get::<Vec<u8>>(0),
                    )
                    .map_err(key_store)?
                else {
                    continue;
                };
                if bytes.get(FP_AT..ID_AT) == Some(&new_fp[..]) {
                    continue;
                }
                let key = unwrap(&self.master, &tenant, &bytes)?;
                let wrapped = wrap(&new_master, &key, rng)?;
                tx.execute(
                    "UPDATE data_keys SET wrapped = ?2 WHERE tenant = ?1",
                    &vals![tenant, wrapped],
                )
                .map_err(key_store)?;
                tx.commit().map_err(key_store)?;
                count += 1;
            }
            self.master = new_master;
            return Ok(count);
        }
        for tenant in self.tenants()? {
            let mut bytes = Vec::with_capacity(KEY_FILE_LEN + 1);
            File::open(self.key_path(&tenant))?
                .take(KEY_FILE_LEN as u64 + 1)
                .read_to_end(&mut bytes)?;
            if bytes.get(FP_AT..ID_AT) == Some(&new_fp[..]) {
                continue;
            }
            let key = unwrap(&self.master, &tenant, &bytes)?;
            let wrapped = wrap(&new_master, &key, rng)?;
            let tmp = self.write_temp(&tenant, &wrapped, rng)?;
            fs::rename(&tmp, self.key_path(&tenant))?;
            count += 1;
        }
        sync_dir(&self.dir)?;
        self.master = new_master;
        Ok(count)
    }

    fn key_path(&self, tenant: &str) -> PathBuf {
        self.dir.join(format!("{tenant}.key"))
    }

    fn write_temp(&self, tenant: &str, bytes: &[u8], rng: &mut impl CryptoRng) -> Result<PathBuf> {
        let mut suffix = [0u8; 8];
        rng.fill_bytes(&mut suffix);
        let path = self
            .dir
            .join(format!(".tmp-{tenant}.{}", hex::encode(suffix)));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(path)
    }
}

fn aad(fp: &[u8], id: &[u8], tenant: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(FP_AT + 16 + tenant.len());
    aad.extend_from_slice(MAGIC);
    aad.push(VERSION);
    aad.extend_from_slice(fp);
    aad.extend_from_slice(id);
    aad.extend_from_slice(tenant.as_bytes());
    aad
}

fn wrap(master: &MasterKey, key: &DataKey, rng: &mut impl CryptoRng) -> Result<Vec<u8>> {
    let fp = master.fingerprint();
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);
    let mut buf = [0u8; KEY_LEN];
    buf.copy_from_slice(key.raw());
    let tag = master
        .cipher()
        .encrypt_inout_detached(
            &nonce.into(),
            &aad(&fp, &key.id().0, key.tenant()),
            (&mut buf[..]).into(),
        )
        .map_err(|_| CryptoError::SealFailed)?;
    let mut out = Vec::with_capacity(KEY_FILE_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&fp);
    out.extend_from_slice(&key.id().0);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    out.extend_from_slice(&tag);
    Ok(out)
}

fn unwrap(master: &MasterKey, tenant: &str, bytes: &[u8]) -> Result<DataKey> {
    let malformed = || CryptoError::KeyFileMalformed {
        tenant: tenant.to_owned(),
    };
    if bytes.len() != KEY_FILE_LEN || &bytes[..8] != MAGIC || bytes[8] != VERSION {
        return Err(malformed());
    }
    let fp = &bytes[FP_AT..ID_AT];
    if fp != master.fingerprint() {
        return Err(CryptoError::MasterKeyMismatch {
            tenant: tenant.to_owned(),
        });
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[ID_AT..NONCE_AT]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&bytes[NONCE_AT..CT_AT]);
    let mut raw = Zeroizing::new([0u8; KEY_LEN]);
    raw.copy_from_slice(&bytes[CT_AT..CT_AT + KEY_LEN]);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&bytes[CT_AT + KEY_LEN..]);
    master
        .cipher()
        .decrypt_inout_detached(
            &nonce.into(),
            &aad(fp, &id, tenant),
            (&mut raw[..]).into(),
            &tag.into(),
        )
        .map_err(|_| CryptoError::KeyFileTampered {
            tenant: tenant.to_owned(),
        })?;
    Ok(DataKey::new(tenant.to_owned(), KeyId(id), raw))
}

/// Overwrites a file with zeros, syncs, unlinks. `Ok(false)` if absent.
fn shred(path: &Path) -> Result<bool> {
    let mut f = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let len = usize::try_from(f.metadata()?.len()).unwrap_or(KEY_FILE_LEN);
    // Key files are 85 bytes; cap the zero buffer for anything odd in the dir.
    f.write_all(&vec![0u8; len.min(1 << 20)])?;
    f.sync_all()?;
    drop(f);
    fs::remove_file(path)?;
    Ok(true)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use std::os::unix::fs::PermissionsExt;

    fn ring(dir: &Path) -> KeyRing {
        KeyRing::open(dir, &[0x42; 32]).unwrap()
    }

    #[test]
    fn create_then_load_returns_same_key_and_file_is_85_bytes_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let kr = ring(tmp.path());
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let k1 = kr.data_key("acme", &mut rng).unwrap();
        let k2 = kr.data_key("acme", &mut rng).unwrap();
        let k3 = kr.load("acme").unwrap();
        assert_eq!(k1.raw(), k2.raw());
        assert_eq!(k1.raw(), k3.raw());
        assert_eq!(k1.id(), k3.id());
        let meta = fs::metadata(kr.dir().join("acme.key")).unwrap();
        assert_eq!(meta.len(), KEY_FILE_LEN as u64);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dmeta = fs::metadata(kr.dir()).unwrap();
        assert_eq!(dmeta.permissions().mode() & 0o777, 0o700);
        // Only the key file remains: the temporary was removed.
        let names: Vec<_> = fs::read_dir(kr.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("acme.key")]);
        // The raw key bytes are not in the file.
        let bytes = fs::read(kr.dir().join("acme.key")).unwrap();
        assert!(!bytes.windows(32).any(|w| w == &k1.raw()[..]));
    }

    #[test]
    fn a_key_appearing_meanwhile_is_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let kr = ring(tmp.path());
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let first = kr.data_key("acme", &mut rng).unwrap();
        // A second creator that did not see the file: link must fail, not replace.
        let other = DataKey::new("acme".into(), KeyId([9; 8]), Zeroizing::new([3; 32]));
        let tmpfile = kr
            .write_temp(
                "acme",
                &wrap(&kr.master, &other, &mut rng).unwrap(),
                &mut rng,
            )
            .unwrap();
        let err = fs::hard_link(&tmpfile, kr.key_path("acme")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(kr.load("acme").unwrap().raw(), first.raw());
    }

    #[test]
    fn renamed_key_file_fails_authentication() {
        let tmp = tempfile::tempdir().unwrap();
        let kr = ring(tmp.path());
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        kr.data_key("acme", &mut rng).unwrap();
        fs::copy(kr.key_path("acme"), kr.key_path("evil")).unwrap();
        assert!(matches!(
            kr.load("evil"),
            Err(CryptoError::KeyFileTampered { tenant }) if tenant == "evil"
        ));
    }

    #[test]
    fn malformed_and_tampered_key_files() {
        let tmp = tempfile::tempdir().unwrap();
        let kr = ring(tmp.path());
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        kr.data_key("acme", &mut rng).unwrap();
        let good = fs::read(kr.key_path("acme")).unwrap();
        for at in [CT_AT, CT_AT + 40, NONCE_AT, ID_AT] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            fs::write(kr.key_path("acme"), &bad).unwrap();
            assert!(
                matches!(kr.load("acme"), Err(CryptoError::KeyFileTampered { .. })),
                "{at}"
            );
        }
        let mut bad = good.clone();
        bad[FP_AT] ^= 1;
        fs::write(kr.key_path("acme"), &bad).unwrap();
        assert!(matches!(
            kr.load("acme"),
            Err(CryptoError::MasterKeyMismatch { .. })
        ));
        for bad in [&good[..84], &[good.as_slice(), b"x"].concat()[..], b""] {
            fs::write(kr.key_path("acme"), bad).unwrap();
            assert!(matches!(
                kr.load("acme"),
                Err(CryptoError::KeyFileMalformed { .. })
            ));
        }
    }

    #[test]
    fn destroy_removes_key_and_leftover_temporaries() {
        let tmp = tempfile::tempdir().unwrap();
        let kr = ring(tmp.path());
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let old = kr.data_key("acme", &mut rng).unwrap();
        kr.data_key("beta", &mut rng).unwrap();
        kr.write_temp("acme", b"leftover", &mut rng).unwrap();
        kr.write_temp("acmex", b"other tenant", &mut rng).unwrap();
        assert!(kr.destroy("acme").unwrap());
        assert!(!kr.destroy("acme").unwrap());
        assert!(matches!(kr.load("acme"), Err(CryptoError::NoKey { .. })));
        let mut names: Vec<_> = fs::read_dir(kr.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2);
        assert_eq!(names[1], "beta.key");
        assert!(names[0].starts_with(".tmp-acmex."));
        // Re-creating gives a new key with a new id.
        let new = kr.data_key("acme", &mut rng).unwrap();
        assert_ne!(new.id(), old.id());
        assert_ne!(new.raw(), old.raw());
    }

    #[test]
    fn rotation_rewraps_keys_and_is_resumable() {
        let tmp = tempfile::tempdir().unwrap();
        let mut kr = ring(tmp.path());
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let a = kr.data_key("acme", &mut rng).unwrap();
        let b = kr.data_key("beta", &mut rng).unwrap();
        assert_eq!(kr.rewrap(&[0x43; 32], &mut rng).unwrap(), 2);
        assert_eq!(kr.load("acme").unwrap().raw(), a.raw());
        assert_eq!(kr.load("beta").unwrap().id(), b.id());
        // The old master no longer opens them.
        let old = ring(tmp.path());
        assert!(matches!(
            old.load("acme"),
            Err(CryptoError::MasterKeyMismatch { .. })
        ));
        // Running it again re-wraps nothing.
        assert_eq!(kr.rewrap(&[0x43; 32], &mut rng).unwrap(), 0);
        assert_eq!(kr.tenants().unwrap(), vec!["acme", "beta"]);
    }

    #[test]
    fn invalid_tenant_is_refused_before_touching_files() {
        let tmp = tempfile::tempdir().unwrap();
        let kr = ring(tmp.path());
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        assert!(matches!(
            kr.data_key("../x", &mut rng),
            Err(CryptoError::InvalidTenant(_))
        ));
        assert!(matches!(
            kr.destroy("a/b"),
            Err(CryptoError::InvalidTenant(_))
        ));
        assert_eq!(fs::read_dir(kr.dir()).unwrap().count(), 0);
    }
}
