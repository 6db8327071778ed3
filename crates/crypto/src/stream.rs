//! Sealed files written and read in chunks: bulk export files of tens of megabytes are
//! encrypted as they are produced and decrypted as they are served, never whole in memory.
//!
//! Format (version 1):
//!
//! ```text
//! header  = "PVSF" ‖ 0x01 ‖ salt (16 random bytes)                 STREAM_HEADER_LEN bytes
//! chunk i = AES-256-GCM(subkey, nonce_i, aad, plaintext_i) ‖ tag    (16-byte tag)
//! subkey  = HKDF-SHA256(ikm = key, salt = salt, info = LABEL_STREAM)
//! nonce_i = i as 88-bit big-endian counter ‖ final flag (0x00, or 0x01 on the last chunk)
//! aad     = u64 BE len(name) ‖ name ‖ header
//! ```
//!
//! Every chunk but the last holds exactly [`STREAM_CHUNK_LEN`] (64 KiB) of plaintext; the
//! last holds 0..=64 KiB, so even an empty file has one (final) chunk.
//!
//! Why this shape — the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár
//! ("Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015):
//! sealing each chunk on its own would let an attacker drop, reorder or repeat chunks or
//! cut the file short without any tag failing. The counter in the nonce pins each chunk to
//! its position, and the final flag marks the one chunk allowed to end the file: a file cut
//! at a chunk boundary ends in a chunk sealed as non-final, which does not open as final;
//! bytes appended after the final chunk make it be opened as non-final, which fails too.
//!
//! The per-file subkey (random salt) means one caller key can seal any number of files
//! without the deterministic nonces ever repeating under one AES key (a repeat needs two
//! files with the same 128-bit salt). The name (the file's name or purpose) and the header
//! are in every chunk's additional data, so a file served under another name, or with its
//! salt or version changed, does not open.
//!
//! Every failure to open — wrong key or name, tampering, truncation, a missing final chunk,
//! extra bytes, reordering — is one `io::Error` of kind [`std::io::ErrorKind::InvalidData`]
//! that names nothing of the content. Note what streaming implies: [`SealedReader`] hands
//! out each chunk once it is authenticated, *before* later chunks are checked, so a caller
//! must not act on (or commit) the data until `read` has returned `Ok(0)` — the end of the
//! final chunk — rather than an error.
//!
//! Key bytes and buffered plaintext live in zeroizing buffers; ring's AES key objects are
//! built per chunk and dropped at once (the key schedule is cheap next to 64 KiB of GCM).

use std::fmt;
use std::io::{self, Read, Write};

use ring::aead::{Aad, Nonce};
use zeroize::Zeroizing;

use crate::keys::{NONCE_LEN, TAG_LEN, aead_key, hkdf_expand, hkdf_extract, push_lp};
use crate::random_bytes;

/// Magic bytes at the start of a sealed file.
pub const STREAM_MAGIC: &[u8; 4] = b"PVSF";
/// Format version byte after the magic.
pub const STREAM_VERSION: u8 = 1;
/// Bytes of the salt in the header.
const SALT_LEN: usize = 16;
/// Length of a sealed file's header: magic, version, salt.
pub const STREAM_HEADER_LEN: usize = STREAM_MAGIC.len() + 1 + SALT_LEN;
/// Plaintext bytes in every chunk but the last.
pub const STREAM_CHUNK_LEN: usize = 64 * 1024;
/// HKDF info of the per-file subkey.
pub const LABEL_STREAM: &str = "phivault-sealed-stream-v1";

/// Ciphertext bytes of a full chunk.
const SEALED_CHUNK_LEN: usize = STREAM_CHUNK_LEN + TAG_LEN;

/// The one error of a file that does not open.
fn invalid() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "sealed file does not open: wrong key or name, damaged or truncated",
    )
}

fn poisoned() -> io::Error {
    io::Error::other("sealed file writer failed earlier; the file is incomplete")
}

fn chunk_nonce(counter: u64, last: bool) -> Nonce {
    let mut nonce = [0u8; NONCE_LEN];
    // 11-byte big-endian counter: the top 3 bytes stay zero.
    nonce[3..11].copy_from_slice(&counter.to_be_bytes());
    nonce[11] = u8::from(last);
    Nonce::assume_unique_for_key(nonce)
}

/// The per-file subkey and the additional data of every chunk.
fn file_keys(key: &[u8; 32], name: &[u8], header: &[u8]) -> (Zeroizing<[u8; 32]>, Vec<u8>) {
    let salt = &header[STREAM_MAGIC.len() + 1..];
    let prk = hkdf_extract(salt, key);
    let subkey = hkdf_expand(&prk, &[LABEL_STREAM.as_bytes()]);
    let mut aad = Vec::with_capacity(8 + name.len() + header.len());
    push_lp(&mut aad, name);
    aad.extend_from_slice(header);
    (subkey, aad)
}

// ---------------------------------------------------------------------------------------
// Writer

/// Seals what is written to it into `out`, chunk by chunk (see the module docs for the
/// format). Call [`SealedWriter::finish`] at the end: it writes the final chunk, without
/// which the file never opens (a writer dropped early thus leaves a file that is refused,
/// not one that silently looks complete).
///
/// `write` buffers up to one chunk; [`Write::flush`] flushes `out` but cannot emit a
/// partial chunk. After an error from `out` the writer refuses further writes.
pub struct SealedWriter<W: Write> {
    out: W,
    key: Zeroizing<[u8; 32]>,
    aad: Vec<u8>,
    /// Plaintext of the current chunk (0..=STREAM_CHUNK_LEN bytes).
    buf: Zeroizing<Vec<u8>>,
    counter: u64,
    poisoned: bool,
}

impl<W: Write> fmt::Debug for SealedWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealedWriter([redacted])")
    }
}

impl<W: Write> SealedWriter<W> {
    /// Starts a sealed file under `key`, bound to `name` (the file's name or purpose: the
    /// reader must give the same), and writes its header to `out`.
    pub fn new(key: &[u8; 32], name: &[u8], mut out: W) -> io::Result<Self> {
        let salt: [u8; SALT_LEN] = random_bytes().map_err(io::Error::other)?;
        let mut header = [0u8; STREAM_HEADER_LEN];
        header[..4].copy_from_slice(STREAM_MAGIC);
        header[4] = STREAM_VERSION;
        header[5..].copy_from_slice(&salt);
        let (key, aad) = file_keys(key, name, &header);
        out.write_all(&header)?;
        Ok(Self {
            out,
            key,
            aad,
            buf: Zeroizing::new(Vec::with_capacity(STREAM_CHUNK_LEN)),
            counter: 0,
            poisoned: false,
        })
    }

    /// Seals the buffered plaintext as chunk `counter` and writes it out.
    fn seal_chunk(&mut self, last: bool) -> io::Result<()> {
        if self.poisoned {
            return Err(poisoned());
        }
        // Set until the chunk is fully out; then the counter moves on.
        self.poisoned = true;
        let key = aead_key(&self.key).map_err(io::Error::other)?;
        let tag = key
            .seal_in_place_separate_tag(
                chunk_nonce(self.counter, last),
                Aad::from(&self.aad[..]),
                &mut self.buf[..],
            )
            .map_err(|_| io::Error::other("sealing a chunk failed"))?;
        self.out.write_all(&self.buf)?;
        self.out.write_all(tag.as_ref())?;
        self.buf.clear();
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| io::Error::other("sealed file too long"))?;
        self.poisoned = false;
        Ok(())
    }

    /// Writes the final chunk (possibly empty), flushes `out` and returns it.
    pub fn finish(mut self) -> io::Result<W> {
        self.seal_chunk(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for SealedWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.poisoned {
            return Err(poisoned());
        }
        if data.is_empty() {
            return Ok(0);
        }
        // A full chunk is sealed only once more data arrives: until then it may be the
        // last one, which must carry the final flag.
        if self.buf.len() == STREAM_CHUNK_LEN {
            self.seal_chunk(false)?;
        }
        let n = (STREAM_CHUNK_LEN - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

// ---------------------------------------------------------------------------------------
// Reader

/// Opens a file written by [`SealedWriter`], chunk by chunk. See the module docs: data is
/// only known to be the whole, untouched file once `read` returns `Ok(0)`.
///
/// Any failure to open is an `io::Error` of kind `InvalidData`, after which every further
/// `read` fails the same way; I/O errors of the input are passed on (and also end the
/// reading: a partly read chunk is not resumed).
pub struct SealedReader<R: Read> {
    input: R,
    key: Zeroizing<[u8; 32]>,
    aad: Vec<u8>,
    /// The current chunk: ciphertext as read, then its plaintext (opened in place).
    buf: Zeroizing<Vec<u8>>,
    /// Plaintext bytes of `buf` and how many have been handed out.
    plain_len: usize,
    pos: usize,
    /// The first byte after a full chunk, read to learn whether that chunk is the last.
    ahead: Option<u8>,
    counter: u64,
    state: ReadState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Reading,
    Done,
    Failed,
}

impl<R: Read> fmt::Debug for SealedReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealedReader([redacted])")
    }
}

impl<R: Read> SealedReader<R> {
    /// Reads the header of a sealed file from `input`; `key` and `name` must be those it
    /// was written with (a mismatch shows at the first `read`). A missing or foreign
    /// header is `InvalidData`.
    pub fn new(key: &[u8; 32], name: &[u8], mut input: R) -> io::Result<Self> {
        let mut header = [0u8; STREAM_HEADER_LEN];
        input.read_exact(&mut header).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                invalid()
            } else {
                e
            }
        })?;
        if &header[..4] != STREAM_MAGIC || header[4] != STREAM_VERSION {
            return Err(invalid());
        }
        let (key, aad) = file_keys(key, name, &header);
        Ok(Self {
            input,
            key,
            aad,
            buf: Zeroizing::new(Vec::with_capacity(SEALED_CHUNK_LEN)),
            plain_len: 0,
            pos: 0,
            ahead: None,
            counter: 0,
            state: ReadState::Reading,
        })
    }

    /// Reads into `buf[filled..]` until it is full or the input ends; returns the new fill.
    fn fill(&mut self, mut filled: usize) -> io::Result<usize> {
        while filled < self.buf.len() {
            match self.input.read(&mut self.buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }

    /// One byte past the current chunk, or `None` at the end of the input.
    fn peek_byte(&mut self) -> io::Result<Option<u8>> {
        let mut b = [0u8; 1];
        loop {
            match self.input.read(&mut b) {
                Ok(0) => return Ok(None),
                Ok(_) => return Ok(Some(b[0])),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads and opens the next chunk into `buf`.
    fn next_chunk(&mut self) -> io::Result<()> {
        self.buf.clear();
        self.buf.resize(SEALED_CHUNK_LEN, 0);
        let mut filled = 0;
        if let Some(b) = self.ahead.take() {
            self.buf[0] = b;
            filled = 1;
        }
        filled = self.fill(filled)?;
        // A chunk is the last one iff nothing follows it.
        let last = if filled == SEALED_CHUNK_LEN {
            self.ahead = self.peek_byte()?;
            self.ahead.is_none()
        } else {
            true
        };
        self.buf.truncate(filled);
        let key = aead_key(&self.key).map_err(|_| invalid())?;
        let plain_len = key
            .open_in_place(
                chunk_nonce(self.counter, last),
                Aad::from(&self.aad[..]),
                &mut self.buf[..],
            )
            .map_err(|_| invalid())?
            .len();
        self.plain_len = plain_len;
        self.pos = 0;
        self.counter = self.counter.checked_add(1).ok_or_else(invalid)?;
        if last {
            self.state = ReadState::Done;
        }
        Ok(())
    }
}

impl<R: Read> Read for SealedReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.state == ReadState::Failed {
                return Err(invalid());
            }
            if self.pos < self.plain_len {
                let n = (self.plain_len - self.pos).min(out.len());
                out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.state == ReadState::Done {
                return Ok(0);
            }
            if let Err(e) = self.next_chunk() {
                self.state = ReadState::Failed;
                self.plain_len = 0;
                self.pos = 0;
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [42u8; 32];
    const NAME: &[u8] = b"export/Patient.ndjson";

    /// Deterministic, non-repeating test data.
    fn data(len: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn seal(key: &[u8; 32], name: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut w = SealedWriter::new(key, name, Vec::new()).expect("new");
        w.write_all(plaintext).expect("write");
        w.finish().expect("finish")
    }

    fn open(key: &[u8; 32], name: &[u8], sealed: &[u8]) -> io::Result<Vec<u8>> {
        let mut r = SealedReader::new(key, name, sealed)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    fn assert_refused(key: &[u8; 32], name: &[u8], sealed: &[u8], what: &str) {
        let err = open(key, name, sealed).expect_err(what);
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}");
        assert_eq!(err.to_string(), invalid().to_string(), "{what}");
    }

    fn sealed_len(plain: usize) -> usize {
        let chunks = plain.div_ceil(STREAM_CHUNK_LEN).max(1);
        STREAM_HEADER_LEN + plain + chunks * TAG_LEN
    }

    #[test]
    fn round_trips_at_chunk_edges() {
        let c = STREAM_CHUNK_LEN;
        for len in [
            0,
            1,
            c - 1,
            c,
            c + 1,
            2 * c,
            3 * c + 5,
            5 * 1024 * 1024 + 123,
        ] {
            let plain = data(len);
            let sealed = seal(&KEY, NAME, &plain);
            assert_eq!(sealed.len(), sealed_len(len), "len {len}");
            assert_eq!(&sealed[..4], STREAM_MAGIC);
            assert_eq!(open(&KEY, NAME, &sealed).expect("open"), plain, "len {len}");
        }
    }

    #[test]
    fn same_key_same_data_gives_different_files() {
        let a = seal(&KEY, NAME, b"abc");
        let b = seal(&KEY, NAME, b"abc");
        assert_ne!(a, b);
        assert_eq!(open(&KEY, NAME, &b).expect("open"), b"abc");
    }

    #[test]
    fn wrong_key_name_or_header_refused() {
        let sealed = seal(&KEY, NAME, &data(1000));
        let mut other = KEY;
        other[0] ^= 1;
        assert_refused(&other, NAME, &sealed, "wrong key");
        assert_refused(&KEY, b"export/Observation.ndjson", &sealed, "wrong name");
        assert_refused(&KEY, b"", &sealed, "empty name");
        for i in 0..STREAM_HEADER_LEN {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert_refused(&KEY, NAME, &bad, "header byte");
        }
        let mut bad = sealed.clone();
        bad[STREAM_HEADER_LEN + 10] ^= 1;
        assert_refused(&KEY, NAME, &bad, "ciphertext byte");
        let mut bad = sealed.clone();
        *bad.last_mut().expect("tag") ^= 1;
        assert_refused(&KEY, NAME, &bad, "tag byte");
        assert_refused(&KEY, NAME, b"", "empty input");
    }

    #[test]
    fn empty_file_has_a_final_chunk() {
        let sealed = seal(&KEY, NAME, b"");
        assert_eq!(sealed.len(), STREAM_HEADER_LEN + TAG_LEN);
        assert_eq!(open(&KEY, NAME, &sealed).expect("open"), b"");
        assert_refused(&KEY, NAME, &sealed[..STREAM_HEADER_LEN], "header only");
    }

    #[test]
    fn truncation_anywhere_refused() {
        let c = SEALED_CHUNK_LEN;
        let h = STREAM_HEADER_LEN;
        // 4 chunks, the last partial; and 2 chunks, the last full.
        for plain_len in [3 * STREAM_CHUNK_LEN + 100, 2 * STREAM_CHUNK_LEN] {
            let sealed = seal(&KEY, NAME, &data(plain_len));
            let mut cuts = vec![0, 1, h - 1, sealed.len() - 1, sealed.len() - TAG_LEN];
            for k in 0..plain_len.div_ceil(STREAM_CHUNK_LEN) {
                for off in [0, 1, TAG_LEN, c / 2, c - 1] {
                    cuts.push(h + k * c + off);
                }
            }
            for cut in cuts.into_iter().filter(|&n| n < sealed.len()) {
                assert_refused(&KEY, NAME, &sealed[..cut], &format!("cut at {cut}"));
            }
        }
    }

    #[test]
    fn extra_bytes_after_final_chunk_refused() {
        for plain_len in [0, 10, STREAM_CHUNK_LEN, 2 * STREAM_CHUNK_LEN + 3] {
            let sealed = seal(&KEY, NAME, &data(plain_len));
            let mut bad = sealed.clone();
            bad.push(0);
            assert_refused(&KEY, NAME, &bad, "one extra byte");
            let mut bad = sealed.clone();
            bad.extend_from_slice(&sealed[STREAM_HEADER_LEN..]);
            assert_refused(&KEY, NAME, &bad, "chunks repeated");
        }
    }

    #[test]
    fn reordered_dropped_or_foreign_chunks_refused() {
        let c = SEALED_CHUNK_LEN;
        let h = STREAM_HEADER_LEN;
        let sealed = seal(&KEY, NAME, &data(3 * STREAM_CHUNK_LEN + 7));
        let chunk = |k: usize| &sealed[h + k * c..(h + (k + 1) * c).min(sealed.len())];

        let swapped = [&sealed[..h], chunk(1), chunk(0), chunk(2), chunk(3)].concat();
        assert_refused(&KEY, NAME, &swapped, "chunks 0 and 1 swapped");
        let dropped = [&sealed[..h], chunk(0), chunk(2), chunk(3)].concat();
        assert_refused(&KEY, NAME, &dropped, "chunk 1 dropped");
        let repeated = [
            &sealed[..h],
            chunk(0),
            chunk(0),
            chunk(1),
            chunk(2),
            chunk(3),
        ]
        .concat();
        assert_refused(&KEY, NAME, &repeated, "chunk 0 repeated");

        // The same chunk position from another file under the same key and name.
        let other = seal(&KEY, NAME, &data(3 * STREAM_CHUNK_LEN + 7));
        let mixed = [
            &sealed[..h + c],
            &other[h + c..h + 2 * c],
            &sealed[h + 2 * c..],
        ]
        .concat();
        assert_refused(&KEY, NAME, &mixed, "foreign chunk");
    }

    #[test]
    fn reader_hands_out_authenticated_chunks_then_fails_and_stays_failed() {
        let plain = data(2 * STREAM_CHUNK_LEN + 10);
        let mut sealed = seal(&KEY, NAME, &plain);
        let n = sealed.len();
        sealed[n - 1] ^= 1;
        let mut r = SealedReader::new(&KEY, NAME, &sealed[..]).expect("header");
        let mut first = vec![0u8; 2 * STREAM_CHUNK_LEN];
        r.read_exact(&mut first)
            .expect("first two chunks authenticate");
        assert_eq!(first, plain[..2 * STREAM_CHUNK_LEN]);
        let mut rest = [0u8; 16];
        for _ in 0..3 {
            let err = r.read(&mut rest).expect_err("final chunk is damaged");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        }
    }

    #[test]
    fn dropped_writer_leaves_a_file_that_does_not_open() {
        let mut out = Vec::new();
        {
            let mut w = SealedWriter::new(&KEY, NAME, &mut out).expect("new");
            w.write_all(&data(3 * STREAM_CHUNK_LEN)).expect("write");
        }
        assert_refused(&KEY, NAME, &out, "no final chunk");
    }

    #[test]
    fn debug_is_redacted() {
        let w = SealedWriter::new(&KEY, NAME, Vec::new()).expect("new");
        assert_eq!(format!("{w:?}"), "SealedWriter([redacted])");
        let sealed = w.finish().expect("finish");
        let r = SealedReader::new(&KEY, NAME, &sealed[..]).expect("new");
        assert_eq!(format!("{r:?}"), "SealedReader([redacted])");
    }

    /// A reader that returns at most `max` bytes per call (and sometimes `Interrupted`).
    struct Trickle<'a> {
        data: &'a [u8],
        max: usize,
        calls: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(7) {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            let n = self.max.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn random_sizes_and_splits(
            len in 0usize..(4 * STREAM_CHUNK_LEN + 100),
            splits in proptest::collection::vec(1usize..(STREAM_CHUNK_LEN + 5000), 1..16),
            read_max in 1usize..(2 * STREAM_CHUNK_LEN),
            out_len in 1usize..20_000,
        ) {
            let plain = data(len);
            let mut w = SealedWriter::new(&KEY, NAME, Vec::new()).expect("new");
            let mut rest = &plain[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = splits[i % splits.len()].min(rest.len());
                w.write_all(&rest[..n]).expect("write");
                rest = &rest[n..];
                i += 1;
            }
            let sealed = w.finish().expect("finish");
            prop_assert_eq!(sealed.len(), sealed_len(len));

            let input = Trickle { data: &sealed, max: read_max, calls: 0 };
            let mut r = SealedReader::new(&KEY, NAME, input).expect("new");
            let mut got = Vec::with_capacity(len);
            let mut buf = vec![0u8; out_len];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("read failed: {e}"),
                }
            }
            prop_assert_eq!(got, plain);
        }
    }
}
