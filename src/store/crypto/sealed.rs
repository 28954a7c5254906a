//! The sealed file format (`.sbrec`): a stream of AES-256-GCM chunks.
//!
//! Owns the byte layout and its checks; must not touch keys on disk
//! (`keyring`) or what the plaintext means (`store::recording`).
//!
//! Layout (all integers big-endian):
//! ```text
//! header   "SBREC\0\r\n" · version 1 · content type (1) · file id (16)
//!          · key id (8) · created, unix seconds (8) · tenant length (1) · tenant
//!          · header tag (16) = GCM(file key, nonce FF FF FF FF ‖ 0⁸, aad = header, "")
//! chunk*   flags (1, bit 0 = final) · file tag (4) = file id[0..4] · index (4)
//!          · length (4) of what follows · ciphertext ‖ tag
//!          nonce = 00 00 00 00 ‖ index (8), aad = file id (16) ‖ the 13 framing bytes
//! ```
//! Every file has its own key derived from the tenant key and its random file
//! id (see `crypto`), so the nonce is a plain counter: the header and each
//! chunk index use a distinct nonce exactly once under that key.
//!
//! What the reader detects, each with its own [`CryptoError`] variant: a
//! flipped byte anywhere (`HeaderTampered`, `ChunkTampered`, or for the
//! unauthenticated-but-checked fields `BadMagic`, `UnsupportedVersion`,
//! `WrongKey`, `WrongTenant`), truncation inside the header or a chunk
//! (`TruncatedHeader`, `TruncatedChunk`), truncation on a chunk boundary
//! (`MissingFinal`), reordered, duplicated or dropped chunks
//! (`ChunkOutOfOrder`: the chunk authenticates under the index it carries,
//! which is not the expected one), a chunk spliced from another file
//! (`ChunkFromOtherFile`), bytes after the final chunk (`TrailingData`) and
//! the wrong key (`WrongTenant`, `WrongKey`). Length fields are capped before
//! anything is allocated; nothing here panics on any input.
//!
//! The writer puts each chunk on the stream with one `write_all` and flushes:
//! after a crash the file holds every chunk written before it, and
//! [`recover`] returns exactly those.

use super::{CryptoError, DataKey, FileId, KeyId, MAX_TENANT_LEN, Result, validate_tenant};
use aes_gcm::Aes256Gcm;
use aes_gcm::aead::AeadInOut;
use std::io::{self, Read, Write};

/// Magic at the start of every sealed file.
pub const MAGIC: &[u8; 8] = b"SBREC\0\r\n";
/// The format version written (and the only one read).
pub const VERSION: u8 = 1;
/// Largest plaintext per chunk (one second of 8 kHz stereo 16-bit PCM is
/// 32 000 bytes; the cap leaves room and bounds every read allocation).
pub const MAX_CHUNK_PLAINTEXT: usize = 64 * 1024;
const TAG_LEN: usize = 16;
const FIXED_HEADER_LEN: usize = 43;
const FRAMING_LEN: usize = 13;
const FLAG_FINAL: u8 = 1;
const HEADER_NONCE: [u8; 12] = [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0];

/// What the writer puts in the header besides the key's tenant and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderMeta {
    /// What the plaintext is (defined by the layer above; e.g. PCM audio).
    pub content_type: u8,
    /// Creation time, unix seconds (passed in: this module reads no clock).
    pub created_unix: u64,
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedHeader {
    pub content_type: u8,
    pub file_id: FileId,
    pub key_id: KeyId,
    pub created_unix: u64,
    pub tenant: String,
}

impl SealedHeader {
    /// Parses the header without a key (to learn which tenant's key opens
    /// the file). Nothing returned here is authenticated yet: only
    /// [`SealedReader::new`] verifies it.
    pub fn read_unverified<R: Read>(r: &mut R) -> Result<Self> {
        Ok(read_header(r)?.0)
    }

    fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(FIXED_HEADER_LEN + self.tenant.len() + TAG_LEN);
        h.extend_from_slice(MAGIC);
        h.push(VERSION);
        h.push(self.content_type);
        h.extend_from_slice(&self.file_id.0);
        h.extend_from_slice(&self.key_id.0);
        h.extend_from_slice(&self.created_unix.to_be_bytes());
        // Tenant names are validated to at most 64 bytes.
        h.push(u8::try_from(self.tenant.len()).unwrap_or(u8::MAX));
        h.extend_from_slice(self.tenant.as_bytes());
        h
    }
}

/// Reads the header and returns it with its encoded bytes and tag.
fn read_header<R: Read>(r: &mut R) -> Result<(SealedHeader, Vec<u8>, [u8; TAG_LEN])> {
    let mut fixed = [0u8; FIXED_HEADER_LEN];
    let got = read_full(r, &mut fixed)?;
    if fixed[..got.min(8)] != MAGIC[..got.min(8)] {
        return Err(CryptoError::BadMagic);
    }
    if got < FIXED_HEADER_LEN {
        return Err(CryptoError::TruncatedHeader);
    }
    if fixed[8] != VERSION {
        return Err(CryptoError::UnsupportedVersion(fixed[8]));
    }
    let tenant_len = usize::from(fixed[42]);
    if tenant_len > MAX_TENANT_LEN {
        return Err(CryptoError::HeaderTampered);
    }
    let mut rest = [0u8; MAX_TENANT_LEN + TAG_LEN];
    let rest = &mut rest[..tenant_len + TAG_LEN];
    if read_full(r, rest)? < rest.len() {
        return Err(CryptoError::TruncatedHeader);
    }
    let tenant = std::str::from_utf8(&rest[..tenant_len])
        .ok()
        .filter(|t| validate_tenant(t).is_ok())
        .ok_or(CryptoError::HeaderTampered)?
        .to_owned();
    let mut file_id = [0u8; 16];
    file_id.copy_from_slice(&fixed[10..26]);
    let mut key_id = [0u8; 8];
    key_id.copy_from_slice(&fixed[26..34]);
    let mut created = [0u8; 8];
    created.copy_from_slice(&fixed[34..42]);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&rest[tenant_len..]);
    let header = SealedHeader {
        content_type: fixed[9],
        file_id: FileId(file_id),
        key_id: KeyId(key_id),
        created_unix: u64::from_be_bytes(created),
        tenant,
    };
    let mut encoded = fixed.to_vec();
    encoded.extend_from_slice(&rest[..tenant_len]);
    Ok((header, encoded, tag))
}

fn chunk_nonce(index: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&u64::from(index).to_be_bytes());
    n
}

fn chunk_aad(file_id: &FileId, framing: &[u8; FRAMING_LEN]) -> [u8; 16 + FRAMING_LEN] {
    let mut aad = [0u8; 16 + FRAMING_LEN];
    aad[..16].copy_from_slice(&file_id.0);
    aad[16..].copy_from_slice(framing);
    aad
}

/// Writes a sealed file: the header at once, then one chunk per call.
pub struct SealedWriter<W: Write> {
    w: W,
    cipher: Aes256Gcm,
    file_id: FileId,
    next_index: u32,
    out: Vec<u8>,
    failed: bool,
    /// Bytes written to `w` (header and chunks).
    bytes: u64,
}

impl<W: Write> SealedWriter<W> {
    /// Writes the authenticated header for `file_id` under `key`. The file id
    /// must be fresh ([`FileId::random`]); reusing one under the same key
    /// reuses nonces.
    pub fn new(mut w: W, key: &DataKey, file_id: FileId, meta: HeaderMeta) -> Result<Self> {
        let cipher = key.file_cipher(&file_id);
        let header = SealedHeader {
            content_type: meta.content_type,
            file_id,
            key_id: key.id(),
            created_unix: meta.created_unix,
            tenant: key.tenant().to_owned(),
        };
        let mut bytes = header.encode();
        let tag = cipher
            .encrypt_inout_detached(&HEADER_NONCE.into(), &bytes, (&mut [][..]).into())
            .map_err(|_| CryptoError::SealFailed)?;
        bytes.extend_from_slice(&tag);
        w.write_all(&bytes)?;
        w.flush()?;
        Ok(Self {
            bytes: bytes.len() as u64,
            w,
            cipher,
            file_id,
            next_index: 0,
            out: Vec::new(),
            failed: false,
        })
    }

    /// Seals and writes one non-final chunk (at most [`MAX_CHUNK_PLAINTEXT`]).
    pub fn write_chunk(&mut self, plaintext: &[u8]) -> Result<()> {
        self.seal(plaintext, false)
    }

    /// Seals and writes the final chunk (may be empty), returning the stream.
    pub fn finish(mut self, last: &[u8]) -> Result<W> {
        self.seal(last, true)?;
        Ok(self.w)
    }

    /// Bytes written so far (header and chunks): the file's size when the
    /// stream is a new file.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Chunks written so far.
    pub fn chunks_written(&self) -> u64 {
        u64::from(self.next_index)
    }

    /// The file id in the header.
    pub fn file_id(&self) -> FileId {
        self.file_id
    }

    fn seal(&mut self, plaintext: &[u8], last: bool) -> Result<()> {
        if self.failed {
            return Err(io::Error::other("sealed writer failed earlier").into());
        }
        if plaintext.len() > MAX_CHUNK_PLAINTEXT {
            return Err(CryptoError::PlaintextTooLong {
                len: plaintext.len(),
                max: MAX_CHUNK_PLAINTEXT,
            });
        }
        let index = self.next_index;
        let next = index
            .checked_add(1)
            .ok_or(CryptoError::InvalidMeta("chunk index overflow"))?;
        let mut framing = [0u8; FRAMING_LEN];
        framing[0] = if last { FLAG_FINAL } else { 0 };
        framing[1..5].copy_from_slice(&self.file_id.0[..4]);
        framing[5..9].copy_from_slice(&index.to_be_bytes());
        // Bounded by MAX_CHUNK_PLAINTEXT above.
        let body_len = u32::try_from(plaintext.len() + TAG_LEN)
            .map_err(|_| CryptoError::InvalidMeta("chunk length"))?;
        framing[9..13].copy_from_slice(&body_len.to_be_bytes());
        self.out.clear();
        self.out.extend_from_slice(&framing);
        self.out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_inout_detached(
                &chunk_nonce(index).into(),
                &chunk_aad(&self.file_id, &framing),
                (&mut self.out[FRAMING_LEN..]).into(),
            )
            .map_err(|_| CryptoError::SealFailed)?;
        self.out.extend_from_slice(&tag);
        let written = self.w.write_all(&self.out).and_then(|()| self.w.flush());
        // Not kept between chunks: a recording writes one chunk a second,
        // and thousands of open recordings would each hold a chunk's buffer.
        self.out = Vec::new();
        if let Err(e) = written {
            self.failed = true;
            return Err(e.into());
        }
        self.bytes += (FRAMING_LEN + plaintext.len() + TAG_LEN) as u64;
        self.next_index = next;
        Ok(())
    }
}

/// Reads a sealed file chunk by chunk, verifying each; an iterator of
/// plaintext chunks that ends after the final chunk or at the first error.
pub struct SealedReader<R: Read> {
    r: R,
    cipher: Aes256Gcm,
    header: SealedHeader,
    next_index: u64,
    state: ReadState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Chunks,
    AfterFinal,
    Done,
}

impl<R: Read> SealedReader<R> {
    /// Reads and verifies the header with `key`: the file must belong to the
    /// key's tenant and name the key's id, and its header must authenticate.
    pub fn new(mut r: R, key: &DataKey) -> Result<Self> {
        let (header, encoded, tag) = read_header(&mut r)?;
        if header.tenant != key.tenant() {
            return Err(CryptoError::WrongTenant {
                file: header.tenant,
                key: key.tenant().to_owned(),
            });
        }
        if header.key_id != key.id() {
            return Err(CryptoError::WrongKey {
                tenant: header.tenant,
                file: header.key_id,
                key: key.id(),
            });
        }
        let cipher = key.file_cipher(&header.file_id);
        cipher
            .decrypt_inout_detached(
                &HEADER_NONCE.into(),
                &encoded,
                (&mut [][..]).into(),
                &tag.into(),
            )
            .map_err(|_| CryptoError::HeaderTampered)?;
        Ok(Self {
            r,
            cipher,
            header,
            next_index: 0,
            state: ReadState::Chunks,
        })
    }

    /// The verified header.
    pub fn header(&self) -> &SealedHeader {
        &self.header
    }

    /// The next verified plaintext chunk; `Ok(None)` after the final chunk
    /// when nothing follows it. After an error, always `Ok(None)`.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        let out = match self.state {
            ReadState::Done => return Ok(None),
            ReadState::AfterFinal => self.check_end().map(|()| None),
            ReadState::Chunks => self.read_chunk().map(Some),
        };
        if out.is_err() || matches!(out, Ok(None)) {
            self.state = ReadState::Done;
        }
        out
    }

    /// Every chunk's plaintext, concatenated; fails unless the file is whole.
    pub fn read_all(mut self) -> Result<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(chunk) = self.next_chunk()? {
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }

    /// The plaintext length of the next chunk, its body read past without
    /// decrypting: only the framing is checked (length cap, index, the
    /// final flag, truncation, trailing bytes), nothing is authenticated but
    /// the header. For learning a file's length cheaply; the content must
    /// still be authenticated chunk by chunk ([`SealedReader::next_chunk`]
    /// on another reader) before it is trusted. `Ok(None)` after the final
    /// chunk; after an error, always `Ok(None)`.
    pub fn skip_chunk(&mut self) -> Result<Option<usize>> {
        let out = match self.state {
            ReadState::Done => return Ok(None),
            ReadState::AfterFinal => self.check_end().map(|()| None),
            ReadState::Chunks => self.skip_one().map(Some),
        };
        if out.is_err() || matches!(out, Ok(None)) {
            self.state = ReadState::Done;
        }
        out
    }

    fn skip_one(&mut self) -> Result<usize> {
        let expected = self.next_index;
        let mut framing = [0u8; FRAMING_LEN];
        match read_full(&mut self.r, &mut framing)? {
            0 => return Err(CryptoError::MissingFinal { chunks: expected }),
            FRAMING_LEN => {}
            _ => return Err(CryptoError::TruncatedChunk { index: expected }),
        }
        let found = u32::from_be_bytes([framing[5], framing[6], framing[7], framing[8]]);
        let len = u32::from_be_bytes([framing[9], framing[10], framing[11], framing[12]]);
        let body_len = u64::from(len);
        if body_len > (MAX_CHUNK_PLAINTEXT + TAG_LEN) as u64 {
            return Err(CryptoError::ChunkTooLong {
                index: expected,
                len,
            });
        }
        let Some(ct_len) = body_len.checked_sub(TAG_LEN as u64) else {
            return Err(CryptoError::ChunkTampered { index: expected });
        };
        if io::copy(&mut (&mut self.r).take(body_len), &mut io::sink())? < body_len {
            return Err(CryptoError::TruncatedChunk { index: expected });
        }
        if u64::from(found) != expected {
            return Err(CryptoError::ChunkOutOfOrder {
                expected,
                found: u64::from(found),
            });
        }
        self.next_index = expected + 1;
        if framing[0] & FLAG_FINAL != 0 {
            self.state = ReadState::AfterFinal;
        }
        // At most MAX_CHUNK_PLAINTEXT (checked above).
        Ok(usize::try_from(ct_len).unwrap_or(MAX_CHUNK_PLAINTEXT))
    }

    fn check_end(&mut self) -> Result<()> {
        let mut b = [0u8; 1];
        if read_full(&mut self.r, &mut b)? == 0 {
            Ok(())
        } else {
            Err(CryptoError::TrailingData {
                after_chunks: self.next_index,
            })
        }
    }

    fn read_chunk(&mut self) -> Result<Vec<u8>> {
        let expected = self.next_index;
        let mut framing = [0u8; FRAMING_LEN];
        match read_full(&mut self.r, &mut framing)? {
            0 => return Err(CryptoError::MissingFinal { chunks: expected }),
            FRAMING_LEN => {}
            _ => return Err(CryptoError::TruncatedChunk { index: expected }),
        }
        let found = u32::from_be_bytes([framing[5], framing[6], framing[7], framing[8]]);
        let len = u32::from_be_bytes([framing[9], framing[10], framing[11], framing[12]]);
        let body_len = usize::try_from(len).unwrap_or(usize::MAX);
        if body_len > MAX_CHUNK_PLAINTEXT + TAG_LEN {
            return Err(CryptoError::ChunkTooLong {
                index: expected,
                len,
            });
        }
        let mut body = vec![0u8; body_len];
        if read_full(&mut self.r, &mut body)? < body_len {
            return Err(CryptoError::TruncatedChunk { index: expected });
        }
        let Some(ct_len) = body_len.checked_sub(TAG_LEN) else {
            return Err(CryptoError::ChunkTampered { index: expected });
        };
        let (ct, tag) = body.split_at_mut(ct_len);
        let mut tag_arr = [0u8; TAG_LEN];
        tag_arr.copy_from_slice(tag);
        let opened = self.cipher.decrypt_inout_detached(
            &chunk_nonce(found).into(),
            &chunk_aad(&self.header.file_id, &framing),
            ct.into(),
            &tag_arr.into(),
        );
        if opened.is_err() {
            return Err(if framing[1..5] != self.header.file_id.0[..4] {
                CryptoError::ChunkFromOtherFile { index: expected }
            } else {
                CryptoError::ChunkTampered { index: expected }
            });
        }
        if u64::from(found) != expected {
            return Err(CryptoError::ChunkOutOfOrder {
                expected,
                found: u64::from(found),
            });
        }
        body.truncate(ct_len);
        self.next_index = expected + 1;
        if framing[0] & FLAG_FINAL != 0 {
            self.state = ReadState::AfterFinal;
        }
        Ok(body)
    }
}

impl<R: Read> Iterator for SealedReader<R> {
    type Item = Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk().transpose()
    }
}

/// What [`recover`] salvaged from a possibly damaged file.
#[derive(Debug)]
pub struct Recovered {
    /// The verified header.
    pub header: SealedHeader,
    /// Every chunk that authenticated, in order, up to the first bad or
    /// missing one.
    pub chunks: Vec<Vec<u8>>,
    /// True when the final chunk was read and nothing follows it.
    pub complete: bool,
    /// Why reading stopped early (`None` when complete).
    pub stopped_by: Option<CryptoError>,
}

/// Crash recovery: keeps every authenticated chunk up to the first bad or
/// missing one. Fails only if the header itself does not verify.
pub fn recover<R: Read>(r: R, key: &DataKey) -> Result<Recovered> {
    let mut reader = SealedReader::new(r, key)?;
    let mut chunks = Vec::new();
    let stopped_by = loop {
        match reader.next_chunk() {
            Ok(Some(c)) => chunks.push(c),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    Ok(Recovered {
        header: reader.header,
        chunks,
        complete: stopped_by.is_none(),
        stopped_by,
    })
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn key(tenant: &str, id: u8) -> DataKey {
        DataKey::new(tenant.into(), KeyId([id; 8]), Zeroizing::new([id; 32]))
    }

    const META: HeaderMeta = HeaderMeta {
        content_type: 1,
        created_unix: 1_700_000_000,
    };

    fn sealed(chunks: &[&[u8]], last: &[u8]) -> Vec<u8> {
        let mut w = SealedWriter::new(Vec::new(), &key("acme", 1), FileId([5; 16]), META).unwrap();
        for c in chunks {
            w.write_chunk(c).unwrap();
        }
        w.finish(last).unwrap()
    }

    #[test]
    fn exact_layout_of_a_small_file() {
        let bytes = sealed(&[b"abc"], b"");
        // header: 43 fixed + "acme" + tag
        let h = 43 + 4 + 16;
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(bytes[8], 1);
        assert_eq!(bytes[9], 1);
        assert_eq!(&bytes[10..26], &[5; 16]);
        assert_eq!(&bytes[26..34], &[1; 8]);
        assert_eq!(&bytes[34..42], &1_700_000_000u64.to_be_bytes());
        assert_eq!(bytes[42], 4);
        assert_eq!(&bytes[43..47], b"acme");
        // chunk 0: flags 0, file tag, index 0, len 3+16
        assert_eq!(&bytes[h..h + 13], &[0, 5, 5, 5, 5, 0, 0, 0, 0, 0, 0, 0, 19]);
        let c1 = h + 13 + 19;
        assert_eq!(
            &bytes[c1..c1 + 13],
            &[1, 5, 5, 5, 5, 0, 0, 0, 1, 0, 0, 0, 16]
        );
        assert_eq!(bytes.len(), c1 + 13 + 16);
        let r = SealedReader::new(&bytes[..], &key("acme", 1)).unwrap();
        assert_eq!(r.header().created_unix, 1_700_000_000);
        let chunks: Vec<_> = r.map(|c| c.unwrap()).collect();
        assert_eq!(chunks, vec![b"abc".to_vec(), Vec::new()]);
    }

    #[test]
    fn oversized_plaintext_is_refused_and_length_cap_checked_before_allocating() {
        let mut w = SealedWriter::new(Vec::new(), &key("acme", 1), FileId([5; 16]), META).unwrap();
        assert!(matches!(
            w.write_chunk(&vec![0; MAX_CHUNK_PLAINTEXT + 1]),
            Err(CryptoError::PlaintextTooLong { .. })
        ));
        let mut bytes = sealed(&[b"abc"], b"");
        let len_at = 63 + 9;
        bytes[len_at..len_at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut r = SealedReader::new(&bytes[..], &key("acme", 1)).unwrap();
        assert!(matches!(
            r.next_chunk(),
            Err(CryptoError::ChunkTooLong {
                index: 0,
                len: u32::MAX
            })
        ));
        assert!(r.next_chunk().unwrap().is_none());
    }

    #[test]
    fn short_body_and_bad_tenant_bytes() {
        let mut bytes = sealed(&[b"abc"], b"");
        bytes[63 + 12] = 3; // body shorter than a tag
        bytes.truncate(63 + 13 + 3);
        let mut r = SealedReader::new(&bytes[..], &key("acme", 1)).unwrap();
        assert!(matches!(
            r.next_chunk(),
            Err(CryptoError::ChunkTampered { index: 0 })
        ));
        let mut bytes = sealed(&[], b"");
        bytes[42] = 200;
        assert!(matches!(
            SealedReader::new(&bytes[..], &key("acme", 1)),
            Err(CryptoError::HeaderTampered)
        ));
        let mut bytes = sealed(&[], b"");
        bytes[43] = b'/';
        assert!(matches!(
            SealedHeader::read_unverified(&mut &bytes[..]),
            Err(CryptoError::HeaderTampered)
        ));
    }

    #[test]
    fn every_prefix_of_a_file_errors_cleanly_and_recovers_whole_chunks() {
        let bytes = sealed(&[b"one", b"two", b"three"], b"end");
        for cut in 0..bytes.len() {
            let r = SealedReader::new(&bytes[..cut], &key("acme", 1));
            let Ok(r) = r else { continue };
            assert!(r.read_all().is_err(), "cut {cut}");
            let rec = recover(&bytes[..cut], &key("acme", 1)).unwrap();
            assert!(!rec.complete);
            let whole = [b"one".as_slice(), b"two", b"three"];
            assert_eq!(rec.chunks, whole[..rec.chunks.len()].to_vec(), "cut {cut}");
        }
        let rec = recover(&bytes[..], &key("acme", 1)).unwrap();
        assert!(rec.complete);
        assert_eq!(rec.chunks.len(), 4);
    }

    #[test]
    fn skipping_gives_each_chunks_length_and_catches_what_framing_shows() {
        let bytes = sealed(&[b"one", b"two", b"three"], b"end");
        let mut r = SealedReader::new(&bytes[..], &key("acme", 1)).unwrap();
        let mut lens = Vec::new();
        while let Some(n) = r.skip_chunk().unwrap() {
            lens.push(n);
        }
        assert_eq!(lens, [3, 3, 5, 3]);
        // Every cut inside the chunks fails while skipping.
        let header_end = bytes.len() - (4 * (FRAMING_LEN + TAG_LEN) + 14);
        for cut in header_end + 1..bytes.len() {
            let mut r = SealedReader::new(&bytes[..cut], &key("acme", 1)).unwrap();
            let skipped = std::iter::from_fn(|| r.skip_chunk().transpose()).find(Result::is_err);
            assert!(skipped.is_some(), "cut {cut}");
        }
        // Trailing bytes too.
        let mut longer = bytes.clone();
        longer.push(0);
        let mut r = SealedReader::new(&longer[..], &key("acme", 1)).unwrap();
        let errs: Vec<_> = std::iter::from_fn(|| r.skip_chunk().transpose())
            .filter_map(Result::err)
            .collect();
        assert!(matches!(
            errs[..],
            [CryptoError::TrailingData { after_chunks: 4 }]
        ));
        // A flipped ciphertext byte is not seen by skipping: only decrypting
        // (`next_chunk`) authenticates.
        let mut flipped = bytes.clone();
        let at = bytes.len() - TAG_LEN - 1;
        flipped[at] ^= 1;
        let mut r = SealedReader::new(&flipped[..], &key("acme", 1)).unwrap();
        assert!(std::iter::from_fn(|| r.skip_chunk().transpose()).all(|c| c.is_ok()));
        assert!(
            SealedReader::new(&flipped[..], &key("acme", 1))
                .unwrap()
                .read_all()
                .is_err()
        );
    }

    #[test]
    fn trailing_data_after_final_is_reported_after_the_final_chunk() {
        let mut bytes = sealed(&[b"a"], b"z");
        bytes.push(0);
        let rec = recover(&bytes[..], &key("acme", 1)).unwrap();
        assert_eq!(rec.chunks, vec![b"a".to_vec(), b"z".to_vec()]);
        assert!(!rec.complete);
        assert!(matches!(
            rec.stopped_by,
            Some(CryptoError::TrailingData { after_chunks: 2 })
        ));
    }

    #[test]
    fn a_failed_write_poisons_the_writer() {
        struct Fails(usize);
        impl Write for Fails {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk full"));
                }
                self.0 -= 1;
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = SealedWriter::new(Fails(1), &key("acme", 1), FileId([1; 16]), META).unwrap();
        assert!(matches!(w.write_chunk(b"x"), Err(CryptoError::Io(_))));
        assert_eq!(w.chunks_written(), 0);
        let err = w.write_chunk(b"y").unwrap_err();
        assert_eq!(err.to_string(), "i/o: sealed writer failed earlier");
    }
}
