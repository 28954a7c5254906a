//! Call recordings: stereo 8 kHz 16-bit PCM (caller left, prompt + agent
//! right), sealed on disk one second at a time, exported as WAV.
//!
//! Owns `var_dir/recordings/<tenant>/<yyyy>/<mm>/<dd>/<file-id>.sbrec`
//! (directories 0700, files 0600, both created with those modes: nothing is
//! chmod-ed afterwards). Must not touch the key files (`crypto::keyring`),
//! the metadata database or retention; reads no clock (the date and creation
//! time come in as parameters).
//!
//! No plaintext audio reaches the disk: samples wait in memory (zeroed when
//! dropped) until a full second is buffered, then go to the file as one
//! sealed chunk. There are no temporary files. A crash loses at most the
//! second being buffered; [`recover_wav`] returns the rest.
//!
//! The WAV header is not stored: the sealed payload is raw interleaved
//! little-endian PCM (content type [`CONTENT_PCM_S16LE_STEREO_8K`] in the
//! sealed header fixes the format), and [`export_wav`] writes a WAV with
//! `hound`, which computes the exact sizes when it finalizes. Storing a
//! header with placeholder sizes would only add a second place to get wrong.

use crate::store::crypto::sealed::{HeaderMeta, SealedHeader, SealedReader, SealedWriter};
use crate::store::crypto::{CryptoError, DataKey, FileId, KeyRing, validate_tenant};
use rand::CryptoRng;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, Cursor, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Sample rate of every recording.
pub const SAMPLE_RATE: u32 = 8000;
/// Channels: 0 = caller, 1 = prompt + agent.
pub const CHANNELS: u16 = 2;
/// Sealed-header content type of a recording.
pub const CONTENT_PCM_S16LE_STEREO_8K: u8 = 1;
/// Frames (one sample per channel) sealed per chunk: one second.
pub const FRAMES_PER_CHUNK: usize = SAMPLE_RATE as usize;
const BYTES_PER_FRAME: usize = 4;
const CHUNK_BYTES: usize = FRAMES_PER_CHUNK * BYTES_PER_FRAME;
/// File name extension of sealed recordings.
pub const EXTENSION: &str = "sbrec";

/// Errors of recording, export and recovery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordingError {
    /// Keys or the sealed format (including every tampering case).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// Creating directories or the file.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// Writing the exported WAV.
    #[error("wav: {0}")]
    Wav(#[from] hound::Error),
    /// Caller misuse: the two channels of one push differ in length.
    #[error("left channel has {left} samples, right {right}")]
    ChannelLengthMismatch { left: usize, right: usize },
    /// Caller misuse: not a calendar date.
    #[error("invalid date {year:04}-{month:02}-{day:02}")]
    InvalidDate { year: u16, month: u8, day: u8 },
    /// The sealed file holds something other than a recording.
    #[error("sealed file has content type {content_type}, not a recording")]
    NotARecording { content_type: u8 },
    /// An authentic chunk whose length is not whole stereo frames (only a
    /// writer bug could produce it).
    #[error("chunk {chunk} holds {len} bytes, not whole stereo frames")]
    PartialFrame { chunk: u64, len: usize },
    /// More audio than a WAV's 32-bit sizes can describe.
    #[error("{frames} frames do not fit in one WAV file")]
    TooLong { frames: u64 },
    /// The file changed between verifying and streaming it.
    #[error("recording changed while it was streamed")]
    Changed,
}

pub type Result<T, E = RecordingError> = std::result::Result<T, E>;

/// The day a recording belongs to (its directory), passed in by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordingDate {
    year: u16,
    month: u8,
    day: u8,
}

impl RecordingDate {
    /// A date in 1970..=9999; day checked against the month (and leap years).
    pub fn new(year: u16, month: u8, day: u8) -> Result<Self> {
        let leap =
            (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
        let days = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => 0,
        };
        if !(1970..=9999).contains(&year) || day == 0 || day > days {
            return Err(RecordingError::InvalidDate { year, month, day });
        }
        Ok(Self { year, month, day })
    }
}

/// Where a recording lives: `var_dir/recordings/<tenant>/<yyyy>/<mm>/<dd>/<id>.sbrec`.
pub fn recording_path(
    var_dir: &Path,
    tenant: &str,
    date: RecordingDate,
    file_id: &FileId,
) -> PathBuf {
    recording_dir(var_dir, tenant, date).join(format!("{file_id}.{EXTENSION}"))
}

fn recording_dir(var_dir: &Path, tenant: &str, date: RecordingDate) -> PathBuf {
    var_dir
        .join("recordings")
        .join(tenant)
        .join(format!("{:04}", date.year))
        .join(format!("{:02}", date.month))
        .join(format!("{:02}", date.day))
}

/// What a finished recording left on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingSummary {
    pub path: PathBuf,
    pub file_id: FileId,
    /// Size of the sealed file.
    pub bytes: u64,
    /// Stereo frames recorded (duration = frames / 8000 s).
    pub frames: u64,
}

/// A recording whose final chunk is written, waiting for its fsync.
#[derive(Debug)]
pub struct SealedRecording {
    file: File,
    path: PathBuf,
    file_id: FileId,
    frames: u64,
}

impl SealedRecording {
    /// The sealed file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the file to disk (data and size) and closes it.
    pub fn sync(self) -> Result<RecordingSummary> {
        self.file.sync_all()?;
        Ok(RecordingSummary {
            bytes: self.file.metadata()?.len(),
            path: self.path,
            file_id: self.file_id,
            frames: self.frames,
        })
    }
}

/// Records one call. Feed it 20 ms at a time with [`push`](Self::push);
/// every full second is sealed and written at once.
pub struct RecordingWriter {
    sealed: SealedWriter<File>,
    path: PathBuf,
    pending: Zeroizing<Vec<u8>>,
    frames: u64,
}

impl RecordingWriter {
    /// Creates the directories (0700) and the file (0600, must not exist)
    /// for a new recording of `key`'s tenant, and writes the sealed header;
    /// when the header cannot be written the file is removed again.
    pub fn create(
        var_dir: &Path,
        key: &DataKey,
        date: RecordingDate,
        created_unix: u64,
        rng: &mut impl CryptoRng,
    ) -> Result<Self> {
        Self::create_as(var_dir, key, date, created_unix, FileId::random(rng))
    }

    /// [`create`](Self::create) with the file id chosen by the caller (fresh
    /// from a CSPRNG: it must never repeat under one key), at
    /// [`recording_path`]: the daemon indexes the recording under this id
    /// on its store thread and creates the file on an I/O thread.
    pub fn create_as(
        var_dir: &Path,
        key: &DataKey,
        date: RecordingDate,
        created_unix: u64,
        file_id: FileId,
    ) -> Result<Self> {
        validate_tenant(key.tenant())?;
        let dir = recording_dir(var_dir, key.tenant(), date);
        DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let path = recording_path(var_dir, key.tenant(), date, &file_id);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let meta = HeaderMeta {
            content_type: CONTENT_PCM_S16LE_STEREO_8K,
            created_unix,
        };
        let sealed = match SealedWriter::new(file, key, file_id, meta) {
            Ok(s) => s,
            Err(e) => {
                // The header did not fit (disk full): no empty file is left
                // behind for nobody to index (issue 19).
                let _ = std::fs::remove_file(&path);
                return Err(e.into());
            }
        };
        Ok(Self {
            sealed,
            path,
            pending: Zeroizing::new(Vec::new()),
            frames: 0,
        })
    }

    /// The sealed file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This recording's file id.
    pub fn file_id(&self) -> FileId {
        self.sealed.file_id()
    }

    /// Bytes of the sealed file written so far.
    pub fn bytes_written(&self) -> u64 {
        self.sealed.bytes_written()
    }

    /// Stereo frames pushed so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Appends audio: `left` (caller) and `right` (prompt + agent) must have
    /// the same length. Seals a chunk each time a second is complete.
    pub fn push(&mut self, left: &[i16], right: &[i16]) -> Result<()> {
        if left.len() != right.len() {
            return Err(RecordingError::ChannelLengthMismatch {
                left: left.len(),
                right: right.len(),
            });
        }
        let mut i = 0;
        while i < left.len() {
            if self.pending.capacity() == 0 {
                // A chunk's room at once: the buffer never grows (a growing
                // Vec would leave copies of plaintext behind, unzeroed).
                self.pending.reserve_exact(CHUNK_BYTES);
            }
            let room = FRAMES_PER_CHUNK - self.pending.len() / BYTES_PER_FRAME;
            let n = room.min(left.len() - i);
            // Within the reserved capacity: no reallocation.
            let start = self.pending.len();
            self.pending.resize(start + n * BYTES_PER_FRAME, 0);
            let frames = self.pending[start..].chunks_exact_mut(BYTES_PER_FRAME);
            for ((f, l), r) in frames.zip(&left[i..i + n]).zip(&right[i..i + n]) {
                f[..2].copy_from_slice(&l.to_le_bytes());
                f[2..].copy_from_slice(&r.to_le_bytes());
            }
            i += n;
            self.frames += n as u64;
            if self.pending.len() == CHUNK_BYTES {
                self.sealed.write_chunk(&self.pending)?;
                // Freed (and zeroed) between seconds: the daemon pushes whole
                // seconds, so thousands of open recordings hold no buffer.
                self.pending = Zeroizing::new(Vec::new());
            }
        }
        Ok(())
    }

    /// Seals what is buffered as the final chunk, syncs the file to disk.
    pub fn finish(self) -> Result<RecordingSummary> {
        self.seal()?.sync()
    }

    /// Seals what is buffered as the final chunk; the file is complete but
    /// not yet synced: [`SealedRecording::sync`] does that, on any thread
    /// (the daemon's store thread hands it to a sync thread, so one slow
    /// fsync does not hold up every other call's rows).
    pub fn seal(self) -> Result<SealedRecording> {
        let file_id = self.sealed.file_id();
        let file = self.sealed.finish(&self.pending)?;
        Ok(SealedRecording {
            file,
            path: self.path,
            file_id,
            frames: self.frames,
        })
    }

    /// Consent opt-out: stops and deletes the file (what is buffered is
    /// zeroed with the writer).
    pub fn discard(self) -> Result<()> {
        let path = self.path.clone();
        drop(self);
        std::fs::remove_file(path)?;
        Ok(())
    }
}

/// Decrypts a recording (key chosen by the tenant in its header) into a
/// WAV in memory. Fails on any damage; see [`recover_wav`] for crash files.
pub fn export_wav(path: &Path, keyring: &KeyRing) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    export_wav_to(path, keyring, &mut out)?;
    Ok(out.into_inner())
}

/// Like [`export_wav`], streaming into `out` chunk by chunk (constant
/// memory). Returns the frames written.
pub fn export_wav_to<W: Write + Seek>(path: &Path, keyring: &KeyRing, out: W) -> Result<u64> {
    let (file, key) = open_with_keyring(path, keyring)?;
    write_wav(SealedReader::new(file, &key)?, out)
}

/// [`export_wav_to`] from a sealed recording already open (e.g. fetched
/// from the object store into an anonymous file).
pub fn export_wav_from<W: Write + Seek>(file: File, keyring: &KeyRing, out: W) -> Result<u64> {
    let (file, key) = keyed(BufReader::new(file), keyring)?;
    write_wav(SealedReader::new(file, &key)?, out)
}

/// [`export_wav`] with an explicit key instead of the key ring.
pub fn export_wav_with_key(path: &Path, key: &DataKey) -> Result<Vec<u8>> {
    let file = BufReader::new(File::open(path)?);
    let mut out = Cursor::new(Vec::new());
    write_wav(SealedReader::new(file, key)?, &mut out)?;
    Ok(out.into_inner())
}

/// Length of the canonical WAV header [`WavStream`] writes (RIFF, `fmt `
/// of 16 bytes, `data`): the same bytes `hound` writes for this format.
pub const WAV_HEADER_LEN: u64 = 44;

/// A recording decrypted as a WAV stream of known length, for senders that
/// cannot seek (an HTTP body): [`WavStream::open`] counts the frames (from
/// the chunks' framing for a whole file; by authenticating each chunk for a
/// partial one), [`WavStream::write_to`] then writes the header and decrypts
/// chunk by chunk, authenticating each before it is written (constant
/// memory, nothing on disk). A whole file damaged after its header fails
/// there, after a prefix was written: a sender must abort, never end the
/// stream short.
///
/// The 44-byte header is written here rather than by `hound`, because
/// `hound` needs `Seek` to fill in the sizes after the samples; the sizes
/// are known before the first sample here, so the header can go first. A
/// test checks the output is byte-identical to [`export_wav`]'s.
#[derive(Debug)]
pub struct WavStream {
    file: BufReader<File>,
    key: DataKey,
    chunks: u64,
    frames: u64,
}

impl WavStream {
    /// Opens and verifies `path`. With `whole`, any damage fails (a
    /// `complete` recording); without, the stream ends before the first
    /// chunk that does not authenticate (a `partial` one, see [`recover_wav`]).
    pub fn open(path: &Path, keyring: &KeyRing, whole: bool) -> Result<Self> {
        let (file, key) = open_with_keyring(path, keyring)?;
        Self::verify(file, key, whole)
    }

    /// [`WavStream::open`] with the tenant's data key already unwrapped (it
    /// must be the key the file names, or this fails).
    pub fn open_with_key(path: &Path, key: DataKey, whole: bool) -> Result<Self> {
        Self::from_file(File::open(path)?, key, whole)
    }

    /// [`WavStream::open_with_key`] of a sealed recording already open
    /// (the object store's, fetched into an anonymous file).
    pub fn from_file(file: File, key: DataKey, whole: bool) -> Result<Self> {
        Self::verify(BufReader::new(file), key, whole)
    }

    fn verify(mut file: BufReader<File>, key: DataKey, whole: bool) -> Result<Self> {
        let (mut chunks, mut frames) = (0u64, 0u64);
        {
            let mut reader = SealedReader::new(&mut file, &key)?;
            check_content(reader.header())?;
            loop {
                // A whole file's length is in its framing: read without
                // decrypting (each chunk is authenticated as it is written
                // out). A partial one ends at the first chunk that does not
                // authenticate, so only decrypting finds its length.
                let next = if whole {
                    reader.skip_chunk()
                } else {
                    reader
                        .next_chunk()
                        .map(|c| c.map(|c| Zeroizing::new(c).len()))
                };
                match next {
                    Ok(Some(len)) => {
                        if !len.is_multiple_of(BYTES_PER_FRAME) {
                            return Err(RecordingError::PartialFrame { chunk: chunks, len });
                        }
                        chunks += 1;
                        frames += (len / BYTES_PER_FRAME) as u64;
                    }
                    Ok(None) => break,
                    Err(e) if whole => return Err(e.into()),
                    Err(_) => break,
                }
            }
        }
        if frames * BYTES_PER_FRAME as u64 + WAV_HEADER_LEN > u64::from(u32::MAX) {
            return Err(RecordingError::TooLong { frames });
        }
        file.rewind()?;
        Ok(Self {
            file,
            key,
            chunks,
            frames,
        })
    }

    /// Stereo frames the WAV holds.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Total bytes [`WavStream::write_to`] writes (header included).
    pub fn len(&self) -> u64 {
        WAV_HEADER_LEN + self.frames * BYTES_PER_FRAME as u64
    }

    /// Never true: the header is always there.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the WAV into `out`; returns the frames written. Fails if the
    /// file changed since [`WavStream::open`] (then `out` got a prefix).
    pub fn write_to(self, mut out: impl Write) -> Result<u64> {
        let mut pieces = self.into_pieces()?;
        while let Some(piece) = pieces.next_piece()? {
            out.write_all(&piece)?;
        }
        out.flush()?;
        Ok(pieces.frames)
    }

    /// The WAV as pieces a caller pulls one at a time ([`WavPieces::next_piece`]):
    /// the header, then one decrypted chunk (a second of audio) per call. Nothing
    /// is read ahead, so a consumer that stops pulling holds one open file and
    /// no buffered audio.
    pub fn into_pieces(self) -> Result<WavPieces> {
        let data_len = u32::try_from(self.frames * BYTES_PER_FRAME as u64).map_err(|_| {
            RecordingError::TooLong {
                frames: self.frames,
            }
        })?;
        let mut header = Vec::with_capacity(WAV_HEADER_LEN as usize);
        header.extend_from_slice(b"RIFF");
        header.extend_from_slice(&(data_len + 36).to_le_bytes());
        header.extend_from_slice(b"WAVEfmt ");
        header.extend_from_slice(&16u32.to_le_bytes());
        header.extend_from_slice(&1u16.to_le_bytes()); // PCM
        header.extend_from_slice(&CHANNELS.to_le_bytes());
        header.extend_from_slice(&SAMPLE_RATE.to_le_bytes());
        header.extend_from_slice(&(SAMPLE_RATE * BYTES_PER_FRAME as u32).to_le_bytes());
        header.extend_from_slice(&(BYTES_PER_FRAME as u16).to_le_bytes());
        header.extend_from_slice(&16u16.to_le_bytes());
        header.extend_from_slice(b"data");
        header.extend_from_slice(&data_len.to_le_bytes());
        let reader = SealedReader::new(self.file, &self.key)?;
        Ok(WavPieces {
            header: Some(header),
            reader,
            chunks_left: self.chunks,
            expected_frames: self.frames,
            frames: 0,
        })
    }
}

/// A [`WavStream`] being read piece by piece (see [`WavStream::into_pieces`]).
pub struct WavPieces {
    header: Option<Vec<u8>>,
    reader: SealedReader<BufReader<File>>,
    chunks_left: u64,
    expected_frames: u64,
    frames: u64,
}

impl std::fmt::Debug for WavPieces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WavPieces")
            .field("chunks_left", &self.chunks_left)
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

impl WavPieces {
    /// The next piece: the 44-byte header first, then each chunk's
    /// plaintext; `Ok(None)` once every frame [`WavStream::open`] counted
    /// was returned. Fails if the file changed since it was opened.
    pub fn next_piece(&mut self) -> Result<Option<Zeroizing<Vec<u8>>>> {
        if let Some(header) = self.header.take() {
            return Ok(Some(Zeroizing::new(header)));
        }
        if self.chunks_left == 0 {
            if self.frames != self.expected_frames {
                return Err(RecordingError::Changed);
            }
            return Ok(None);
        }
        let chunk = Zeroizing::new(self.reader.next_chunk()?.ok_or(RecordingError::Changed)?);
        self.chunks_left -= 1;
        self.frames += (chunk.len() / BYTES_PER_FRAME) as u64;
        if self.frames > self.expected_frames || !chunk.len().is_multiple_of(BYTES_PER_FRAME) {
            return Err(RecordingError::Changed);
        }
        Ok(Some(chunk))
    }

    /// Stereo frames returned so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Every byte of the WAV was returned (what follows is at most an
    /// empty final chunk, then `Ok(None)`).
    pub fn is_done(&self) -> bool {
        self.header.is_none() && self.frames == self.expected_frames
    }
}

/// What [`recover_wav`] salvaged.
#[derive(Debug)]
pub struct RecoveredWav {
    /// A valid WAV of every authenticated chunk.
    pub wav: Vec<u8>,
    /// Stereo frames in `wav`.
    pub frames: u64,
    /// True when the recording was finished properly and is undamaged.
    pub complete: bool,
    /// Why reading stopped early (`None` when complete).
    pub stopped_by: Option<CryptoError>,
}

/// Crash recovery: a WAV of every chunk up to the first bad or missing one
/// (at most the last second before a crash is lost).
pub fn recover_wav(path: &Path, keyring: &KeyRing) -> Result<RecoveredWav> {
    recover_wav_from(File::open(path)?, keyring)
}

/// [`recover_wav`] of a sealed recording already open.
pub fn recover_wav_from(file: File, keyring: &KeyRing) -> Result<RecoveredWav> {
    let (file, key) = keyed(BufReader::new(file), keyring)?;
    let mut reader = SealedReader::new(file, &key)?;
    check_content(reader.header())?;
    let mut out = Cursor::new(Vec::new());
    let mut wav = hound::WavWriter::new(&mut out, wav_spec())?;
    let mut index = 0u64;
    let stopped_by = loop {
        match reader.next_chunk() {
            Ok(Some(chunk)) => {
                write_frames(&mut wav, &chunk, index)?;
                index += 1;
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let frames = u64::from(wav.len()) / u64::from(CHANNELS);
    wav.finalize()?;
    Ok(RecoveredWav {
        wav: out.into_inner(),
        frames,
        complete: stopped_by.is_none(),
        stopped_by,
    })
}

fn open_with_keyring(path: &Path, keyring: &KeyRing) -> Result<(BufReader<File>, DataKey)> {
    keyed(BufReader::new(File::open(path)?), keyring)
}

fn keyed(mut file: BufReader<File>, keyring: &KeyRing) -> Result<(BufReader<File>, DataKey)> {
    // Only to pick the key: the header is verified by `SealedReader::new`
    // before anything in it (content type included) is trusted.
    let header = SealedHeader::read_unverified(&mut file)?;
    let key = keyring.load(&header.tenant)?;
    file.rewind()?;
    Ok((file, key))
}

fn check_content(header: &SealedHeader) -> Result<()> {
    if header.content_type == CONTENT_PCM_S16LE_STEREO_8K {
        Ok(())
    } else {
        Err(RecordingError::NotARecording {
            content_type: header.content_type,
        })
    }
}

fn wav_spec() -> hound::WavSpec {
    hound::WavSpec {
        channels: CHANNELS,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    }
}

fn write_wav<R: Read, W: Write + Seek>(mut reader: SealedReader<R>, out: W) -> Result<u64> {
    check_content(reader.header())?;
    let mut wav = hound::WavWriter::new(out, wav_spec())?;
    let mut index = 0u64;
    while let Some(chunk) = reader.next_chunk()? {
        write_frames(&mut wav, &chunk, index)?;
        index += 1;
    }
    let frames = u64::from(wav.len()) / u64::from(CHANNELS);
    wav.finalize()?;
    Ok(frames)
}

fn write_frames<W: Write + Seek>(
    wav: &mut hound::WavWriter<W>,
    chunk: &[u8],
    index: u64,
) -> Result<()> {
    if !chunk.len().is_multiple_of(BYTES_PER_FRAME) {
        return Err(RecordingError::PartialFrame {
            chunk: index,
            len: chunk.len(),
        });
    }
    let samples = u32::try_from(chunk.len() / 2).unwrap_or(u32::MAX);
    let mut w = wav.get_i16_writer(samples);
    for s in chunk.chunks_exact(2) {
        w.write_sample(i16::from_le_bytes([s[0], s[1]]));
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A recording of 2.5 s (two whole chunks and a half one) in `dir`.
    fn recording(dir: &Path) -> (PathBuf, KeyRing) {
        let keyring = KeyRing::open(dir, &[9u8; 32]).unwrap();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let key = keyring.data_key("acme", &mut rng).unwrap();
        let date = RecordingDate::new(2026, 11, 22).unwrap();
        let mut w = RecordingWriter::create(dir, &key, date, 1_700_000_000, &mut rng).unwrap();
        let left: Vec<i16> = (0..20_000).map(|i| (i % 300) as i16 * 7).collect();
        let right: Vec<i16> = (0..20_000).map(|i| -((i % 97) as i16) * 11).collect();
        for (l, r) in left.chunks(160).zip(right.chunks(160)) {
            w.push(l, r).unwrap();
        }
        let path = w.path().to_owned();
        w.finish().unwrap();
        (path, keyring)
    }

    #[test]
    fn wav_stream_is_byte_identical_to_hound_export() {
        let dir = tempfile::tempdir().unwrap();
        let (path, keyring) = recording(dir.path());
        let stream = WavStream::open(&path, &keyring, true).unwrap();
        assert_eq!(stream.frames(), 20_000);
        assert_eq!(stream.len(), 44 + 80_000);
        let mut out = Vec::new();
        assert_eq!(stream.write_to(&mut out).unwrap(), 20_000);
        assert_eq!(out, export_wav(&path, &keyring).unwrap());
    }

    #[test]
    fn wav_stream_of_a_damaged_file_fails_whole_or_stops_before_the_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (path, keyring) = recording(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 20;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        // Whole: the length comes from the framing; the damage stops the
        // stream at the chunk, after the clean ones were written.
        let whole = WavStream::open(&path, &keyring, true).unwrap();
        assert_eq!(whole.frames(), 20_000);
        let mut prefix = Vec::new();
        assert!(matches!(
            whole.write_to(&mut prefix),
            Err(RecordingError::Crypto(CryptoError::ChunkTampered {
                index: 2
            }))
        ));
        assert_eq!(prefix.len(), 44 + 64_000);
        // A truncated whole file fails at once.
        let cut = dir.path().join("cut.sbrec");
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        assert!(matches!(
            WavStream::open(&cut, &keyring, true),
            Err(RecordingError::Crypto(CryptoError::TruncatedChunk {
                index: 2
            }))
        ));
        let stream = WavStream::open(&path, &keyring, false).unwrap();
        assert_eq!(stream.frames(), 16_000);
        let mut out = Vec::new();
        stream.write_to(&mut out).unwrap();
        assert_eq!(out, recover_wav(&path, &keyring).unwrap().wav);
    }
}
