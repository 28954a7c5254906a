#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Encryption at rest, end to end: recordings sealed on disk, exported as
//! WAV, every kind of damage detected, crashes recovered, tenants shredded.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sipbridge::store::crypto::sealed::{HeaderMeta, SealedWriter};
use sipbridge::store::crypto::{CryptoError, FileId, KeyRing};
use sipbridge::store::recording::{
    FRAMES_PER_CHUNK, RecordingDate, RecordingError, RecordingWriter, export_wav,
    export_wav_with_key, recording_path, recover_wav,
};
use std::collections::HashSet;
use std::fs;
use std::io::Cursor;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const MASTER: [u8; 32] = [0x5a; 32];
const FRAME: usize = 160; // 20 ms at 8 kHz
const HEADER_LEN: usize = 43 + 4 + 16; // fixed part, "acme", tag
const FULL_CHUNK: usize = 13 + 32_000 + 16;
const CREATED: u64 = 1_741_305_600;

/// Caller: a hash of the sample index (never repeats within a call).
fn left(n: usize) -> i16 {
    ((n as u32).wrapping_mul(2_654_435_761) >> 16) as i16
}

/// Agent: a sawtooth, distinct from the caller.
fn right(n: usize) -> i16 {
    ((n * 3) % 20_000) as i16 - 10_000
}

fn date() -> RecordingDate {
    RecordingDate::new(2025, 3, 7).unwrap()
}

struct Setup {
    _tmp: tempfile::TempDir,
    var: PathBuf,
    ring: KeyRing,
    rng: ChaCha20Rng,
}

fn setup(seed: u64) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let var = tmp.path().join("var");
    let ring = KeyRing::open(&var, &MASTER).unwrap();
    Setup {
        _tmp: tmp,
        var,
        ring,
        rng: ChaCha20Rng::seed_from_u64(seed),
    }
}

/// Pushes `frames` stereo frames (from sample `start`) in 20 ms pushes.
fn push_frames(w: &mut RecordingWriter, start: usize, frames: usize) {
    let mut n = start;
    while n < start + frames {
        let len = FRAME.min(start + frames - n);
        let l: Vec<i16> = (n..n + len).map(left).collect();
        let r: Vec<i16> = (n..n + len).map(right).collect();
        w.push(&l, &r).unwrap();
        n += len;
    }
}

fn new_writer(s: &mut Setup, tenant: &str) -> RecordingWriter {
    let key = s.ring.data_key(tenant, &mut s.rng).unwrap();
    RecordingWriter::create(&s.var, &key, date(), CREATED, &mut s.rng).unwrap()
}

/// A finished recording of `frames` frames; returns its path.
fn recording(s: &mut Setup, tenant: &str, frames: usize) -> PathBuf {
    let mut w = new_writer(s, tenant);
    push_frames(&mut w, 0, frames);
    w.finish().unwrap().path
}

fn interleaved(frames: usize) -> Vec<i16> {
    (0..frames).flat_map(|n| [left(n), right(n)]).collect()
}

fn read_wav(wav: &[u8]) -> (hound::WavSpec, Vec<i16>) {
    let mut r = hound::WavReader::new(Cursor::new(wav)).unwrap();
    let spec = r.spec();
    let samples = r.samples::<i16>().map(|s| s.unwrap()).collect();
    (spec, samples)
}

#[test]
fn five_seconds_round_trip_to_an_identical_wav() {
    let mut s = setup(1);
    let mut w = new_writer(&mut s, "acme");
    let file_id = w.file_id();
    push_frames(&mut w, 0, 5 * 8000);
    let summary = w.finish().unwrap();
    assert_eq!(summary.frames, 40_000);
    assert_eq!(
        summary.path,
        s.var
            .join("recordings/acme/2025/03/07")
            .join(format!("{}.sbrec", file_id.to_hex()))
    );
    assert_eq!(
        summary.path,
        recording_path(&s.var, "acme", date(), &file_id)
    );
    // Header, five full chunks, an empty final chunk.
    let expected_len = HEADER_LEN + 5 * FULL_CHUNK + 13 + 16;
    assert_eq!(summary.bytes, expected_len as u64);
    assert_eq!(
        fs::metadata(&summary.path).unwrap().len(),
        expected_len as u64
    );

    let wav = export_wav(&summary.path, &s.ring).unwrap();
    assert_eq!(wav.len(), 44 + 160_000);
    let (spec, samples) = read_wav(&wav);
    assert_eq!(spec.channels, 2);
    assert_eq!(spec.sample_rate, 8000);
    assert_eq!(spec.bits_per_sample, 16);
    assert_eq!(spec.sample_format, hound::SampleFormat::Int);
    assert_eq!(samples, interleaved(40_000));
}

#[test]
fn odd_push_sizes_are_chunked_per_second_and_round_trip() {
    let mut s = setup(2);
    let mut w = new_writer(&mut s, "acme");
    let path = w.path().to_owned();
    let header_only = fs::metadata(&path).unwrap().len();
    assert_eq!(header_only, HEADER_LEN as u64);
    let mut n = 0;
    for size in [1usize, 333, 7999, 8000, 12_345, 0, 20] {
        let l: Vec<i16> = (n..n + size).map(left).collect();
        let r: Vec<i16> = (n..n + size).map(right).collect();
        w.push(&l, &r).unwrap();
        n += size;
        // Exactly one chunk on disk per whole second pushed.
        let chunks = n / FRAMES_PER_CHUNK;
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            (HEADER_LEN + chunks * FULL_CHUNK) as u64,
            "after {n} frames"
        );
    }
    assert_eq!(w.frames(), n as u64);
    assert!(matches!(
        w.push(&[1, 2], &[3]),
        Err(RecordingError::ChannelLengthMismatch { left: 2, right: 1 })
    ));
    let summary = w.finish().unwrap();
    let (_, samples) = read_wav(&export_wav(&summary.path, &s.ring).unwrap());
    assert_eq!(samples, interleaved(n));
}

#[test]
fn permissions_are_0700_and_0600_from_creation() {
    let mut s = setup(3);
    let path = recording(&mut s, "acme", 100);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    for dir in [
        "recordings",
        "recordings/acme",
        "recordings/acme/2025",
        "recordings/acme/2025/03",
        "recordings/acme/2025/03/07",
        "keys",
    ] {
        assert_eq!(mode(&s.var.join(dir)), 0o700, "{dir}");
    }
    assert_eq!(mode(&s.var.join("keys/acme.key")), 0o600);
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// True if any 16-byte run of `plain` occurs in `disk`.
fn shares_a_run(disk: &[u8], plain: &[u8]) -> bool {
    let on_disk: HashSet<&[u8]> = disk.windows(16).collect();
    plain.windows(16).any(|w| on_disk.contains(w))
}

#[test]
fn privacy_aes256gcm_at_rest_no_plaintext_while_recording_or_after() {
    let mut s = setup(4);
    let mut w = new_writer(&mut s, "acme");
    push_frames(&mut w, 0, 2 * 8000 + 4000);
    let plain: Vec<u8> = interleaved(5 * 8000)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let check = |when: &str| {
        let mut files = Vec::new();
        all_files(&s.var, &mut files);
        files.sort();
        assert_eq!(files.len(), 2, "{when}: {files:?}"); // the key and the recording
        for f in &files {
            let bytes = fs::read(f).unwrap();
            assert!(!bytes.windows(4).any(|x| x == b"RIFF"), "{when} {f:?}");
            assert!(!bytes.windows(4).any(|x| x == b"WAVE"), "{when} {f:?}");
            assert!(!shares_a_run(&bytes, &plain), "{when} {f:?}");
        }
    };
    check("mid-recording");
    push_frames(&mut w, 20_000, 20_000);
    w.finish().unwrap();
    check("finished");
    // The check itself would catch plaintext: the exported WAV fails it.
    let mut files = Vec::new();
    all_files(&s.var.join("recordings"), &mut files);
    let wav = export_wav(&files[0], &s.ring).unwrap();
    assert!(shares_a_run(&wav, &plain));
    assert_eq!(&wav[..4], b"RIFF");
}

/// 3.5 s: chunks 0..=2 full, chunk 3 final with 0.5 s.
fn tamper_base(s: &mut Setup) -> (PathBuf, Vec<u8>) {
    let path = recording(s, "acme", 3 * 8000 + 4000);
    let bytes = fs::read(&path).unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + 3 * FULL_CHUNK + 13 + 16_000 + 16);
    (path, bytes)
}

/// Which error a damaged file must give.
type Expect = fn(&CryptoError) -> bool;

fn chunk_at(k: usize) -> usize {
    HEADER_LEN + k * FULL_CHUNK
}

fn export_bytes(s: &Setup, bytes: &[u8]) -> Result<Vec<u8>, RecordingError> {
    let path = s.var.join("recordings/acme/2025/03/07/tampered.sbrec");
    fs::write(&path, bytes).unwrap();
    export_wav(&path, &s.ring)
}

fn crypto_err(r: Result<Vec<u8>, RecordingError>) -> CryptoError {
    match r {
        Err(RecordingError::Crypto(e)) => e,
        other => panic!("expected a crypto error, got {other:?}"),
    }
}

#[test]
fn a_flipped_byte_in_each_region_is_detected() {
    let mut s = setup(5);
    let (path, good) = tamper_base(&mut s);
    assert!(export_bytes(&s, &good).is_ok());
    let flip = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 1;
        b
    };
    let c1 = chunk_at(1);
    let cases: Vec<(&str, usize, Expect)> = vec![
        ("magic", 0, |e| matches!(e, CryptoError::BadMagic)),
        ("version", 8, |e| {
            matches!(e, CryptoError::UnsupportedVersion(0))
        }),
        ("content type", 9, |e| {
            matches!(e, CryptoError::HeaderTampered)
        }),
        ("file id", 10, |e| matches!(e, CryptoError::HeaderTampered)),
        ("key id", 26, |e| matches!(e, CryptoError::WrongKey { .. })),
        ("created", 41, |e| matches!(e, CryptoError::HeaderTampered)),
        ("header tag", 50, |e| {
            matches!(e, CryptoError::HeaderTampered)
        }),
        ("chunk flags", c1, |e| {
            matches!(e, CryptoError::ChunkTampered { index: 1 })
        }),
        ("chunk file tag", c1 + 2, |e| {
            matches!(e, CryptoError::ChunkFromOtherFile { index: 1 })
        }),
        ("chunk index", c1 + 8, |e| {
            matches!(e, CryptoError::ChunkTampered { index: 1 })
        }),
        ("chunk length", c1 + 12, |e| {
            matches!(e, CryptoError::ChunkTampered { index: 1 })
        }),
        ("chunk ciphertext", c1 + 13 + 16_000, |e| {
            matches!(e, CryptoError::ChunkTampered { index: 1 })
        }),
        ("chunk tag", c1 + FULL_CHUNK - 1, |e| {
            matches!(e, CryptoError::ChunkTampered { index: 1 })
        }),
        ("first chunk", chunk_at(0) + 13, |e| {
            matches!(e, CryptoError::ChunkTampered { index: 0 })
        }),
        ("final chunk", chunk_at(3) + 20, |e| {
            matches!(e, CryptoError::ChunkTampered { index: 3 })
        }),
    ];
    for (region, at, expected) in cases {
        let err = crypto_err(export_bytes(&s, &flip(at)));
        assert!(expected(&err), "{region} (byte {at}): got {err:?}");
    }
    // The tenant name: the key ring has no key for "acmd"; with acme's key
    // the mismatch is named.
    let tampered = s.var.join("recordings/acme/2025/03/07/tampered.sbrec");
    fs::write(&tampered, flip(43 + 3)).unwrap();
    assert!(matches!(
        export_wav(&tampered, &s.ring),
        Err(RecordingError::Crypto(CryptoError::NoKey { tenant })) if tenant == "acmd"
    ));
    let acme = s.ring.load("acme").unwrap();
    assert!(matches!(
        export_wav_with_key(&tampered, &acme),
        Err(RecordingError::Crypto(CryptoError::WrongTenant { file, key }))
            if file == "acmd" && key == "acme"
    ));
    // A sweep over header and framing bytes and a stride through the rest:
    // every flip is an error, none panics.
    let mut positions: Vec<usize> = (0..HEADER_LEN + 13).collect();
    positions.extend((0..4).flat_map(|k| chunk_at(k)..chunk_at(k) + 13));
    positions.extend((0..good.len()).step_by(4099));
    for at in positions {
        assert!(export_bytes(&s, &flip(at)).is_err(), "byte {at}");
    }
    assert!(export_wav(&path, &s.ring).is_ok());
}

#[test]
fn truncation_is_detected_mid_chunk_and_at_boundaries() {
    let mut s = setup(6);
    let (_, good) = tamper_base(&mut s);
    let cases: Vec<(&str, usize, Expect)> = vec![
        ("inside header", 30, |e| {
            matches!(e, CryptoError::TruncatedHeader)
        }),
        ("inside header tag", HEADER_LEN - 1, |e| {
            matches!(e, CryptoError::TruncatedHeader)
        }),
        ("after header", HEADER_LEN, |e| {
            matches!(e, CryptoError::MissingFinal { chunks: 0 })
        }),
        ("inside framing", chunk_at(2) + 5, |e| {
            matches!(e, CryptoError::TruncatedChunk { index: 2 })
        }),
        ("mid chunk", chunk_at(2) + 9_000, |e| {
            matches!(e, CryptoError::TruncatedChunk { index: 2 })
        }),
        ("one byte short", good.len() - 1, |e| {
            matches!(e, CryptoError::TruncatedChunk { index: 3 })
        }),
        ("boundary before final", chunk_at(3), |e| {
            matches!(e, CryptoError::MissingFinal { chunks: 3 })
        }),
        ("boundary after chunk 1", chunk_at(2), |e| {
            matches!(e, CryptoError::MissingFinal { chunks: 2 })
        }),
    ];
    for (what, cut, expected) in cases {
        let err = crypto_err(export_bytes(&s, &good[..cut]));
        assert!(expected(&err), "{what} (cut {cut}): got {err:?}");
    }
    let mut longer = good.clone();
    longer.extend_from_slice(b"junk");
    let err = crypto_err(export_bytes(&s, &longer));
    assert!(
        matches!(err, CryptoError::TrailingData { after_chunks: 4 }),
        "{err:?}"
    );
}

#[test]
fn reordered_dropped_duplicated_and_spliced_chunks_are_detected() {
    let mut s = setup(7);
    let (_, good) = tamper_base(&mut s);
    let chunk = |b: &[u8], k: usize| b[chunk_at(k)..chunk_at(k + 1)].to_vec();
    let header = good[..HEADER_LEN].to_vec();
    let tail = good[chunk_at(3)..].to_vec();

    let swapped = [
        header.clone(),
        chunk(&good, 0),
        chunk(&good, 2),
        chunk(&good, 1),
        tail.clone(),
    ]
    .concat();
    let err = crypto_err(export_bytes(&s, &swapped));
    assert!(
        matches!(
            err,
            CryptoError::ChunkOutOfOrder {
                expected: 1,
                found: 2
            }
        ),
        "{err:?}"
    );

    let dropped = [
        header.clone(),
        chunk(&good, 0),
        chunk(&good, 2),
        tail.clone(),
    ]
    .concat();
    let err = crypto_err(export_bytes(&s, &dropped));
    assert!(
        matches!(
            err,
            CryptoError::ChunkOutOfOrder {
                expected: 1,
                found: 2
            }
        ),
        "{err:?}"
    );

    let duplicated = [header.clone(), chunk(&good, 0), chunk(&good, 0)].concat();
    let err = crypto_err(export_bytes(&s, &duplicated));
    assert!(
        matches!(
            err,
            CryptoError::ChunkOutOfOrder {
                expected: 1,
                found: 0
            }
        ),
        "{err:?}"
    );

    // Chunk 1 of another recording of the same tenant, same key.
    let other_path = recording(&mut s, "acme", 3 * 8000 + 4000);
    let other = fs::read(other_path).unwrap();
    let spliced = [
        header.clone(),
        chunk(&good, 0),
        chunk(&other, 1),
        chunk(&good, 2),
        tail.clone(),
    ]
    .concat();
    let err = crypto_err(export_bytes(&s, &spliced));
    assert!(
        matches!(err, CryptoError::ChunkFromOtherFile { index: 1 }),
        "{err:?}"
    );
    // Even the other file's final chunk at the end of this one.
    let other_tail = other[chunk_at(3)..].to_vec();
    let spliced_final = [
        header,
        chunk(&good, 0),
        chunk(&good, 1),
        chunk(&good, 2),
        other_tail,
    ]
    .concat();
    let err = crypto_err(export_bytes(&s, &spliced_final));
    assert!(
        matches!(err, CryptoError::ChunkFromOtherFile { index: 3 }),
        "{err:?}"
    );
}

#[test]
fn another_tenants_key_and_a_wrong_master_key_fail() {
    let mut s = setup(8);
    let path = recording(&mut s, "acme", 8000);
    let beta = s.ring.data_key("beta", &mut s.rng).unwrap();
    assert!(matches!(
        export_wav_with_key(&path, &beta),
        Err(RecordingError::Crypto(CryptoError::WrongTenant { file, key }))
            if file == "acme" && key == "beta"
    ));
    // A beta file relabelled as acme (same key id forged) still fails: the
    // header is authenticated under beta's key, not acme's.
    let mut w = RecordingWriter::create(&s.var, &beta, date(), CREATED, &mut s.rng).unwrap();
    push_frames(&mut w, 0, 100);
    let beta_path = w.finish().unwrap().path;
    let acme = s.ring.load("acme").unwrap();
    let mut forged = fs::read(&beta_path).unwrap();
    forged[43..47].copy_from_slice(b"acme");
    forged[26..34].copy_from_slice(&acme.id().0);
    let forged_path = s.var.join("recordings/acme/2025/03/07/forged.sbrec");
    fs::write(&forged_path, &forged).unwrap();
    assert!(matches!(
        export_wav(&forged_path, &s.ring),
        Err(RecordingError::Crypto(CryptoError::HeaderTampered))
    ));

    let wrong_master = KeyRing::open(&s.var, &[0xa5; 32]).unwrap();
    assert!(matches!(
        export_wav(&path, &wrong_master),
        Err(RecordingError::Crypto(CryptoError::MasterKeyMismatch { tenant })) if tenant == "acme"
    ));
    assert!(export_wav(&path, &s.ring).is_ok());
}

#[test]
fn a_crash_mid_write_keeps_every_complete_second() {
    let mut s = setup(9);
    let mut w = new_writer(&mut s, "acme");
    let path = w.path().to_owned();
    // Killed 5.5 s in: the writer is dropped without `finish` (as a kill
    // would leave it; nothing after the last sealed chunk reaches the disk).
    let killed_at = 5 * 8000 + 4000;
    push_frames(&mut w, 0, killed_at);
    drop(w);
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        (HEADER_LEN + 5 * FULL_CHUNK) as u64
    );
    assert!(matches!(
        export_wav(&path, &s.ring),
        Err(RecordingError::Crypto(CryptoError::MissingFinal {
            chunks: 5
        }))
    ));
    let rec = recover_wav(&path, &s.ring).unwrap();
    assert!(!rec.complete);
    assert!(matches!(
        rec.stopped_by,
        Some(CryptoError::MissingFinal { chunks: 5 })
    ));
    assert_eq!(rec.frames, 40_000);
    assert!(killed_at as u64 - rec.frames <= 8000);
    let (_, samples) = read_wav(&rec.wav);
    assert_eq!(samples, interleaved(40_000));

    // The kill also tore the chunk being written: cut the file inside
    // chunk 4 (the audio of seconds 4..5).
    let bytes = fs::read(&path).unwrap();
    let cut = chunk_at(4) + 20_000;
    fs::write(&path, &bytes[..cut]).unwrap();
    let rec = recover_wav(&path, &s.ring).unwrap();
    assert!(!rec.complete);
    assert!(matches!(
        rec.stopped_by,
        Some(CryptoError::TruncatedChunk { index: 4 })
    ));
    assert_eq!(rec.frames, 32_000);
    // The cut fell at ~4.6 s of audio: less than a second is lost.
    let audio_at_cut = 4 * 8000 + (20_000 - 13) / 4;
    assert!(audio_at_cut as u64 - rec.frames <= 8000);
    let (_, samples) = read_wav(&rec.wav);
    assert_eq!(samples, interleaved(32_000));

    // A finished file recovers whole.
    let done = recording(&mut s, "acme", 12_000);
    let rec = recover_wav(&done, &s.ring).unwrap();
    assert!(rec.complete && rec.stopped_by.is_none());
    assert_eq!(rec.frames, 12_000);
}

#[test]
fn privacy_crypto_shredding_makes_every_file_of_the_tenant_undecryptable() {
    let mut s = setup(10);
    let a1 = recording(&mut s, "acme", 8000);
    let a2 = recording(&mut s, "acme", 100);
    let b = recording(&mut s, "beta", 100);
    let old_id = s.ring.load("acme").unwrap().id();
    assert!(s.ring.destroy("acme").unwrap());
    assert!(!s.var.join("keys/acme.key").exists());
    for p in [&a1, &a2] {
        assert!(matches!(
            export_wav(p, &s.ring),
            Err(RecordingError::Crypto(CryptoError::NoKey { .. }))
        ));
        assert!(matches!(
            recover_wav(p, &s.ring),
            Err(RecordingError::Crypto(CryptoError::NoKey { .. }))
        ));
    }
    // Another tenant is untouched.
    assert!(export_wav(&b, &s.ring).is_ok());
    // A new key for the same tenant opens nothing old.
    let new = s.ring.data_key("acme", &mut s.rng).unwrap();
    assert_ne!(new.id(), old_id);
    assert!(matches!(
        export_wav(&a1, &s.ring),
        Err(RecordingError::Crypto(CryptoError::WrongKey { file, key, .. }))
            if file == old_id && key == new.id()
    ));
}

#[test]
fn master_key_rotation_keeps_recordings_readable() {
    let mut s = setup(11);
    let path = recording(&mut s, "acme", 8000);
    let before = export_wav(&path, &s.ring).unwrap();
    let mut ring = KeyRing::open(&s.var, &MASTER).unwrap();
    assert_eq!(ring.rewrap(&[0x77; 32], &mut s.rng).unwrap(), 1);
    let rotated = KeyRing::open(&s.var, &[0x77; 32]).unwrap();
    assert_eq!(export_wav(&path, &rotated).unwrap(), before);
    assert!(matches!(
        export_wav(&path, &s.ring),
        Err(RecordingError::Crypto(
            CryptoError::MasterKeyMismatch { .. }
        ))
    ));
}

#[test]
fn opt_out_discard_leaves_no_file() {
    let mut s = setup(12);
    let mut w = new_writer(&mut s, "acme");
    push_frames(&mut w, 0, 12_000);
    let path = w.path().to_owned();
    assert!(path.exists());
    w.discard().unwrap();
    assert!(!path.exists());
    let mut files = Vec::new();
    all_files(&s.var.join("recordings"), &mut files);
    assert!(files.is_empty(), "{files:?}");
}

#[test]
fn a_sealed_file_of_another_content_type_is_not_exported_as_audio() {
    let mut s = setup(13);
    let key = s.ring.data_key("acme", &mut s.rng).unwrap();
    let meta = HeaderMeta {
        content_type: 2,
        created_unix: CREATED,
    };
    let w = SealedWriter::new(Vec::new(), &key, FileId::random(&mut s.rng), meta).unwrap();
    let bytes = w.finish(b"a transcript").unwrap();
    let path = s.var.join("transcript.sbrec");
    fs::write(&path, bytes).unwrap();
    assert!(matches!(
        export_wav(&path, &s.ring),
        Err(RecordingError::NotARecording { content_type: 2 })
    ));
}

#[test]
fn dates_are_validated() {
    assert!(RecordingDate::new(2024, 2, 29).is_ok());
    assert!(RecordingDate::new(2000, 2, 29).is_ok());
    for (y, m, d) in [
        (2023, 2, 29),
        (2100, 2, 29),
        (2025, 13, 1),
        (2025, 4, 31),
        (2025, 1, 0),
        (1969, 12, 31),
    ] {
        assert!(
            matches!(
                RecordingDate::new(y, m, d),
                Err(RecordingError::InvalidDate { .. })
            ),
            "{y}-{m}-{d}"
        );
    }
}
