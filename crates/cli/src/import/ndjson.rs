//! NDJSON inputs (one resource a line, as FHIR Bulk Data exports write them), cut into
//! chunks that go to the server as one Bundle each.
//!
//! A chunk is at most [`CHUNK_LINES`] resources or about [`CHUNK_BYTES`] of lines, whichever
//! comes first; blank lines are skipped. The cut depends only on the file's content, so a
//! rerun cuts the same chunks and the resume file can name them by number.
//!
//! Each line becomes one entry:
//! - a resource with an `id` is `PUT Type/id` (update-as-create): loading it twice leaves
//!   one resource, whose content is the line's;
//! - one without an `id` but with an `identifier` (system and value) is a conditional
//!   create, `POST Type` with `ifNoneExist: identifier=system|value` on its first such
//!   identifier: loading it twice leaves one;
//! - one with neither is refused (reported with its line number, not sent): nothing would
//!   tell a rerun that it was already loaded, so a resumed import could duplicate it.
//!
//! References are sent as they are: a Bulk Data export's `Patient/123` names the resource
//! that its own line `PUT`s, in whatever order the files load.

use std::io::{BufRead, Read as _};

use serde_json::{Value, json};

/// Resources in one chunk, at most.
pub const CHUNK_LINES: usize = 250;
/// A chunk ends once its lines reach this many bytes (the server takes 16 MiB a request).
pub const CHUNK_BYTES: usize = 4 << 20;
/// The longest line sent: with a chunk's other lines (under [`CHUNK_BYTES`]) and the
/// Bundle around them it stays under the server's 16 MiB request limit. A longer line is
/// reported, not read into memory, and the rest of the file loads.
pub const MAX_LINE: usize = 11 << 20;

/// Consecutive lines of an NDJSON file.
#[derive(Debug)]
pub struct Chunk {
    /// Its number in the file, from 0.
    pub index: u64,
    /// The non-blank lines: (line number from 1, content).
    pub lines: Vec<(usize, Vec<u8>)>,
    /// Lines longer than [`MAX_LINE`] (line numbers): skipped, reported.
    pub oversized: Vec<usize>,
    /// Bytes of the file it covers (with blank lines and newlines).
    pub bytes: u64,
}

/// The chunks of an NDJSON stream, in order.
pub struct Chunks<R> {
    reader: R,
    line: usize,
    index: u64,
    max_lines: usize,
    max_bytes: usize,
    max_line: usize,
}

impl<R: BufRead> Chunks<R> {
    pub fn new(reader: R) -> Self {
        Self::with_limits(reader, CHUNK_LINES, CHUNK_BYTES)
    }

    pub fn with_limits(reader: R, max_lines: usize, max_bytes: usize) -> Self {
        Chunks {
            reader,
            line: 0,
            index: 0,
            max_lines: max_lines.max(1),
            max_bytes,
            max_line: MAX_LINE,
        }
    }
}

#[cfg(test)]
impl<R: BufRead> Chunks<R> {
    fn with_max_line(mut self, max_line: usize) -> Self {
        self.max_line = max_line;
        self
    }
}

/// Read past the rest of a line without keeping it; the bytes skipped.
fn skip_line<R: BufRead>(reader: &mut R) -> std::io::Result<u64> {
    let mut skipped = 0u64;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(skipped);
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(skipped + i as u64 + 1);
            }
            None => {
                let n = buf.len();
                reader.consume(n);
                skipped += n as u64;
            }
        }
    }
}

impl<R: BufRead> Iterator for Chunks<R> {
    type Item = std::io::Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut chunk = Chunk {
            index: self.index,
            lines: Vec::new(),
            oversized: Vec::new(),
            bytes: 0,
        };
        let mut held = 0usize;
        while chunk.lines.len() < self.max_lines && held < self.max_bytes {
            let mut buf = Vec::new();
            let limit = (self.max_line + 1) as u64;
            match (&mut self.reader).take(limit).read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.line += 1;
                    chunk.bytes += n as u64;
                    if n > self.max_line && buf.last() != Some(&b'\n') {
                        match skip_line(&mut self.reader) {
                            Ok(rest) => chunk.bytes += rest,
                            Err(e) => return Some(Err(e)),
                        }
                        chunk.oversized.push(self.line);
                        continue;
                    }
                    let trimmed = buf.trim_ascii();
                    if !trimmed.is_empty() {
                        held += trimmed.len();
                        chunk.lines.push((self.line, trimmed.to_vec()));
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
        if chunk.lines.is_empty() && chunk.oversized.is_empty() {
            return None;
        }
        self.index += 1;
        Some(Ok(chunk))
    }
}

/// A chunk as a Bundle of `kind` (`transaction` or `batch`): the Bundle, the line number of
/// each of its entries, and the lines refused before sending (line number, why).
pub fn bundle_of(chunk: &Chunk, kind: &str) -> (Value, Vec<usize>, Vec<(usize, String)>) {
    let mut entries = Vec::with_capacity(chunk.lines.len());
    let mut lines = Vec::with_capacity(chunk.lines.len());
    let mut refused: Vec<(usize, String)> = chunk
        .oversized
        .iter()
        .map(|&n| {
            (
                n,
                format!(
                    "longer than {} MiB, more than a request to the server may carry",
                    MAX_LINE >> 20
                ),
            )
        })
        .collect();
    for (n, text) in &chunk.lines {
        match entry_of(text) {
            Ok(e) => {
                entries.push(e);
                lines.push(*n);
            }
            Err(why) => refused.push((*n, why)),
        }
    }
    let bundle = json!({"resourceType": "Bundle", "type": kind, "entry": entries});
    (bundle, lines, refused)
}

/// The Bundle entry for one line (see the module docs); the error names no content.
fn entry_of(text: &[u8]) -> Result<Value, String> {
    let resource: Value = serde_json::from_slice(text).map_err(|e| {
        format!(
            "not JSON ({:?} error at column {})",
            e.classify(),
            e.column()
        )
    })?;
    let rtype = match resource.get("resourceType").and_then(Value::as_str) {
        Some(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphabetic()) => t.to_owned(),
        _ => return Err("not a FHIR resource (no resourceType)".into()),
    };
    if let Some(id) = resource.get("id") {
        let id = id
            .as_str()
            .filter(|i| is_fhir_id(i))
            .ok_or("its id is not a FHIR id ([A-Za-z0-9-.]{1,64})")?
            .to_owned();
        return Ok(json!({
            "resource": resource,
            "request": {"method": "PUT", "url": format!("{rtype}/{id}")},
        }));
    }
    let identifier = resource
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find_map(|i| Some((i.get("system")?.as_str()?, i.get("value")?.as_str()?)));
    match identifier {
        Some((system, value)) => {
            let criteria = format!("identifier={}|{}", encode(system), encode(value));
            Ok(json!({
                "resource": resource,
                "request": {"method": "POST", "url": rtype, "ifNoneExist": criteria},
            }))
        }
        None => Err(
            "no id and no identifier with system and value: refused, since a rerun \
                     could not tell it was loaded already"
                .into(),
        ),
    }
}

/// A FHIR `id`: 1 to 64 of `A-Z a-z 0-9 - .`.
fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Percent-encoding of a search value (everything but RFC 3986's unreserved characters).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: usize) -> String {
        (0..n)
            .map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"p{i}\"}}\n"))
            .collect()
    }

    #[test]
    fn chunks_cut_by_count_and_skip_blank_lines() {
        let mut text = lines(5);
        text.insert_str(0, "\n  \n");
        text.push_str("\n{\"resourceType\":\"Patient\",\"id\":\"last\"}");
        let chunks: Vec<Chunk> = Chunks::with_limits(text.as_bytes(), 2, 1 << 20)
            .collect::<Result<_, _>>()
            .expect("chunks");
        let numbers: Vec<Vec<usize>> = chunks
            .iter()
            .map(|c| c.lines.iter().map(|(n, _)| *n).collect())
            .collect();
        assert_eq!(numbers, [vec![3, 4], vec![5, 6], vec![7, 9]]);
        assert_eq!(
            chunks.iter().map(|c| c.index).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        let covered: u64 = chunks.iter().map(|c| c.bytes).sum();
        assert_eq!(covered, text.len() as u64, "every byte is in one chunk");
    }

    #[test]
    fn an_overlong_line_is_skipped_unread_and_reported_and_the_rest_loads() {
        let long = format!(
            "{{\"resourceType\":\"Patient\",\"id\":\"big\",\"x\":\"{}\"}}",
            "a".repeat(5000)
        );
        let text = format!("{}{long}\n{}", lines(1), lines(2));
        let chunks: Vec<Chunk> = Chunks::with_limits(text.as_bytes(), 1000, 1 << 20)
            .with_max_line(1000)
            .collect::<Result<_, _>>()
            .expect("chunks");
        assert_eq!(chunks.len(), 1);
        let c = &chunks[0];
        assert_eq!(c.oversized, [2]);
        let kept: Vec<usize> = c.lines.iter().map(|(n, _)| *n).collect();
        assert_eq!(kept, [1, 3, 4]);
        assert_eq!(c.bytes, text.len() as u64, "every byte is in one chunk");
        let (_, sent, refused) = bundle_of(c, "transaction");
        assert_eq!(sent, [1, 3, 4]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, 2);
        assert!(refused[0].1.contains("longer than"), "{}", refused[0].1);
        // a file that is one overlong line without a newline
        let only: Vec<Chunk> = Chunks::with_limits(long.as_bytes(), 1000, 1 << 20)
            .with_max_line(1000)
            .collect::<Result<_, _>>()
            .expect("chunks");
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].oversized, [1]);
        assert!(only[0].lines.is_empty());
    }

    #[test]
    fn chunks_cut_by_size_and_the_cut_is_the_same_every_time() {
        let text = lines(40);
        let cut = || -> Vec<Vec<usize>> {
            Chunks::with_limits(text.as_bytes(), 1000, 200)
                .map(|c| c.expect("chunk").lines.iter().map(|(n, _)| *n).collect())
                .collect()
        };
        let first = cut();
        assert!(first.len() > 1, "{first:?}");
        assert!(first.iter().all(|c| c.len() < 10), "{first:?}");
        assert_eq!(first, cut());
        assert_eq!(first.concat(), (1..=40).collect::<Vec<_>>());
        assert_eq!(Chunks::new(&b""[..]).count(), 0);
        assert_eq!(Chunks::new(&b"\n\n"[..]).count(), 0);
    }

    #[test]
    fn lines_become_puts_conditional_creates_or_are_refused() {
        let text = concat!(
            "{\"resourceType\":\"Observation\",\"id\":\"o-1\",\"subject\":{\"reference\":\"Patient/p\"}}\n",
            "{\"resourceType\":\"Patient\",\"identifier\":[{\"value\":\"x\"},{\"system\":\"urn:s\",\"value\":\"a b&c|d\"}]}\n",
            "{\"resourceType\":\"Patient\",\"name\":[{\"family\":\"Secret\"}]}\n",
            "{\"resourceType\":\"Patient\",\"id\":\"no/slashes\"}\n",
            "not json Secret\n",
            "[1]\n",
        );
        let chunk = Chunks::new(text.as_bytes())
            .next()
            .expect("a chunk")
            .expect("read");
        let (bundle, numbers, refused) = bundle_of(&chunk, "transaction");
        assert_eq!(bundle["type"], "transaction");
        assert_eq!(numbers, [1, 2]);
        let e = &bundle["entry"];
        assert_eq!(
            e[0]["request"],
            json!({"method": "PUT", "url": "Observation/o-1"})
        );
        assert_eq!(e[0]["resource"]["subject"]["reference"], "Patient/p");
        assert_eq!(
            e[1]["request"],
            json!({"method": "POST", "url": "Patient",
                   "ifNoneExist": "identifier=urn%3As|a%20b%26c%7Cd"})
        );
        assert_eq!(
            refused.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [3, 4, 5, 6]
        );
        for (_, why) in &refused {
            assert!(!why.contains("Secret"), "an error repeats content: {why}");
        }
        assert!(refused[0].1.contains("no id"));
    }
}
