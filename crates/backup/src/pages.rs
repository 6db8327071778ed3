//! The bodies of backup objects, before compression and sealing.
//!
//! A **segment** is a batch of committed pages: the newest image of every page the writer
//! committed between two shipments, with the database's size after the last commit, its
//! place in the epoch's chain (`prev`: the previous segment's digest) and where the audit
//! log stood. A **snapshot** is the database file at one commit, zstd-compressed as one
//! stream and cut into parts.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use crate::BackupError;

const SEGMENT_MAGIC: &[u8; 4] = b"PVSG";
/// zstd level of segments (fast: they are shipped within the second) and snapshots.
const SEGMENT_LEVEL: i32 = 1;
const SNAPSHOT_LEVEL: i32 = 3;
/// Largest decompressed segment accepted (1 GiB).
const MAX_SEGMENT: u64 = 1 << 30;

/// A segment's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub epoch: u64,
    pub seq: u64,
    /// The previous segment of the epoch (SHA-256 of its sealed object); zeros for the
    /// epoch's first.
    pub prev: [u8; 32],
    pub first_commit: u64,
    pub last_commit: u64,
    pub time_ms: i64,
    pub audit_size: u64,
    pub resources: u64,
    pub page_size: u32,
    pub db_pages: u32,
}

/// A decoded segment.
#[derive(Debug)]
pub struct Segment {
    pub header: SegmentHeader,
    pub pages: BTreeMap<u32, Vec<u8>>,
}

/// Encode and compress a segment.
pub fn encode_segment(
    h: &SegmentHeader,
    pages: &BTreeMap<u32, Vec<u8>>,
) -> Result<Vec<u8>, BackupError> {
    let mut raw = Vec::with_capacity(128 + pages.len() * (4 + h.page_size as usize));
    raw.extend_from_slice(SEGMENT_MAGIC);
    for v in [h.epoch, h.seq] {
        raw.extend_from_slice(&v.to_be_bytes());
    }
    raw.extend_from_slice(&h.prev);
    for v in [h.first_commit, h.last_commit] {
        raw.extend_from_slice(&v.to_be_bytes());
    }
    raw.extend_from_slice(&h.time_ms.to_be_bytes());
    for v in [h.audit_size, h.resources] {
        raw.extend_from_slice(&v.to_be_bytes());
    }
    raw.extend_from_slice(&h.page_size.to_be_bytes());
    raw.extend_from_slice(&h.db_pages.to_be_bytes());
    raw.extend_from_slice(&u32::try_from(pages.len()).unwrap_or(u32::MAX).to_be_bytes());
    for (pgno, page) in pages {
        if page.len() != h.page_size as usize {
            return Err(BackupError::Store("a page of the wrong size".into()));
        }
        raw.extend_from_slice(&pgno.to_be_bytes());
        raw.extend_from_slice(page);
    }
    zstd::bulk::compress(&raw, SEGMENT_LEVEL)
        .map_err(|e| BackupError::Store(format!("cannot compress a segment: {e}")))
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], BackupError> {
        if self.0.len() < n {
            return Err(BackupError::Refused("a segment ends early".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64, BackupError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, BackupError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
}

/// Decompress and decode a segment (its object already opened and checked).
pub fn decode_segment(compressed: &[u8]) -> Result<Segment, BackupError> {
    let mut raw = Vec::new();
    zstd::stream::read::Decoder::new(compressed)
        .map_err(|e| BackupError::Refused(format!("a segment does not decompress: {e}")))?
        .take(MAX_SEGMENT)
        .read_to_end(&mut raw)
        .map_err(|e| BackupError::Refused(format!("a segment does not decompress: {e}")))?;
    let mut c = Cursor(&raw);
    if c.take(4)? != SEGMENT_MAGIC {
        return Err(BackupError::Refused("not a segment".into()));
    }
    let epoch = c.u64()?;
    let seq = c.u64()?;
    let mut prev = [0u8; 32];
    prev.copy_from_slice(c.take(32)?);
    let first_commit = c.u64()?;
    let last_commit = c.u64()?;
    let time_ms = i64::from_be_bytes(c.u64()?.to_be_bytes());
    let audit_size = c.u64()?;
    let resources = c.u64()?;
    let page_size = c.u32()?;
    let db_pages = c.u32()?;
    if !(512..=65_536).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(BackupError::Refused(
            "a segment names no valid page size".into(),
        ));
    }
    let n = c.u32()?;
    let mut pages = BTreeMap::new();
    for _ in 0..n {
        let pgno = c.u32()?;
        let page = c.take(page_size as usize)?.to_vec();
        if pgno == 0 {
            return Err(BackupError::Refused("a segment names page 0".into()));
        }
        pages.insert(pgno, page);
    }
    Ok(Segment {
        header: SegmentHeader {
            epoch,
            seq,
            prev,
            first_commit,
            last_commit,
            time_ms,
            audit_size,
            resources,
            page_size,
            db_pages,
        },
        pages,
    })
}

/// Write a segment's pages into the database file being rebuilt and cut it to the
/// segment's size.
pub fn apply_segment(db: &std::fs::File, seg: &Segment) -> Result<(), BackupError> {
    use std::os::unix::fs::FileExt as _;
    let ps = u64::from(seg.header.page_size);
    for (pgno, page) in &seg.pages {
        if *pgno > seg.header.db_pages {
            // a page freed by the time of the last commit
            continue;
        }
        db.write_all_at(page, (u64::from(*pgno) - 1) * ps)
            .map_err(|e| BackupError::Config(format!("cannot write the restored database: {e}")))?;
    }
    db.set_len(u64::from(seg.header.db_pages) * ps)
        .map_err(|e| BackupError::Config(format!("cannot write the restored database: {e}")))
}

/// Compress the file `path` as one zstd stream cut into parts of at most `part_bytes`,
/// calling `part` with each (in order) as it is ready.
pub fn snapshot_parts(
    path: &std::path::Path,
    part_bytes: usize,
    part: &mut dyn FnMut(Vec<u8>) -> Result<(), BackupError>,
) -> Result<u64, BackupError> {
    struct Parts<'a> {
        buf: Vec<u8>,
        limit: usize,
        part: &'a mut dyn FnMut(Vec<u8>) -> Result<(), BackupError>,
        failed: Option<BackupError>,
    }
    impl Write for Parts<'_> {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.buf.extend_from_slice(data);
            while self.buf.len() >= self.limit {
                let rest = self.buf.split_off(self.limit);
                let full = std::mem::replace(&mut self.buf, rest);
                if let Err(e) = (self.part)(full) {
                    self.failed = Some(e);
                    return Err(std::io::Error::other("part upload failed"));
                }
            }
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut file = std::fs::File::open(path).map_err(|e| BackupError::io(path, &e))?;
    let mut parts = Parts {
        buf: Vec::new(),
        limit: part_bytes.max(1),
        part,
        failed: None,
    };
    let copied = {
        let mut enc = zstd::stream::write::Encoder::new(&mut parts, SNAPSHOT_LEVEL)
            .map_err(|e| BackupError::Store(format!("cannot compress the snapshot: {e}")))?;
        let n = std::io::copy(&mut file, &mut enc);
        let done = n.and_then(|n| enc.finish().map(|_| n));
        match done {
            Ok(n) => n,
            Err(e) => {
                return Err(parts.failed.take().unwrap_or_else(|| {
                    BackupError::Store(format!("cannot compress the snapshot: {e}"))
                }));
            }
        }
    };
    if !parts.buf.is_empty() {
        let last = std::mem::take(&mut parts.buf);
        (parts.part)(last)?;
    }
    Ok(copied)
}

/// Decompress a snapshot's parts (in order) into the file `out`.
pub fn write_snapshot(parts: &[Vec<u8>], out: &mut std::fs::File) -> Result<u64, BackupError> {
    struct Chain<'a> {
        parts: &'a [Vec<u8>],
        i: usize,
        at: usize,
    }
    impl Read for Chain<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            while self.i < self.parts.len() {
                let p = &self.parts[self.i];
                if self.at < p.len() {
                    let n = buf.len().min(p.len() - self.at);
                    buf[..n].copy_from_slice(&p[self.at..self.at + n]);
                    self.at += n;
                    return Ok(n);
                }
                self.i += 1;
                self.at = 0;
            }
            Ok(0)
        }
    }
    let mut dec = zstd::stream::read::Decoder::new(Chain { parts, i: 0, at: 0 })
        .map_err(|e| BackupError::Refused(format!("the snapshot does not decompress: {e}")))?;
    std::io::copy(&mut dec, out)
        .map_err(|e| BackupError::Refused(format!("the snapshot does not decompress: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_round_trips() {
        let h = SegmentHeader {
            epoch: 3,
            seq: 9,
            prev: [5; 32],
            first_commit: 10,
            last_commit: 12,
            time_ms: 1_700_000_000_000,
            audit_size: 77,
            resources: 4,
            page_size: 512,
            db_pages: 8,
        };
        let pages: BTreeMap<u32, Vec<u8>> = [(1, vec![1u8; 512]), (7, vec![7u8; 512])].into();
        let enc = encode_segment(&h, &pages).expect("encode");
        let dec = decode_segment(&enc).expect("decode");
        assert_eq!(dec.header, h);
        assert_eq!(dec.pages, pages);
        assert!(decode_segment(&enc[..enc.len() / 2]).is_err());
    }

    #[test]
    fn a_snapshot_round_trips_through_parts() {
        let tmp = tempfile::tempdir().expect("tmp");
        let src = tmp.path().join("db");
        // (pseudo-random: it must not compress into one part)
        let mut x = 0x9e37_79b9_u32;
        let data: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_le_bytes()[0]
            })
            .collect();
        std::fs::write(&src, &data).expect("write");
        let mut parts = Vec::new();
        let n = snapshot_parts(&src, 1000, &mut |p| {
            parts.push(p);
            Ok(())
        })
        .expect("parts");
        assert_eq!(n, data.len() as u64);
        assert!(parts.len() > 1);
        let out_path = tmp.path().join("out");
        let mut out = std::fs::File::create(&out_path).expect("create");
        write_snapshot(&parts, &mut out).expect("write");
        assert_eq!(std::fs::read(&out_path).expect("read"), data);
    }
}
