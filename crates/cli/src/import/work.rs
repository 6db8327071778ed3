//! What a worker does with one unit of work: send it to the server and read the answer.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::Value;

use super::ndjson::{self, Chunk};
use crate::fhir_client::Client;

/// A unit of work: one Bundle file or one NDJSON chunk.
pub enum Unit {
    Bundle {
        input: usize,
        path: PathBuf,
        bytes: u64,
    },
    Chunk {
        input: usize,
        chunk: Chunk,
    },
}

/// What the server acknowledged of a unit.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Entries the server answered with 2xx.
    pub resources: u64,
    /// Of those, entries it created (201); the others were there already or updated.
    pub created: u64,
    /// Input bytes the unit covered.
    pub bytes: u64,
    /// What went wrong (no resource content); empty when the unit was acknowledged whole.
    pub errors: Vec<String>,
}

/// What the import's main loop hears.
pub enum Event {
    /// A unit was sent; `chunk` is the NDJSON chunk's number.
    Done {
        input: usize,
        chunk: Option<u64>,
        outcome: Outcome,
    },
    /// A chunk acknowledged in an earlier run was not sent again.
    Skipped { bytes: u64 },
    /// Every chunk of an NDJSON input was handed out (or skipped): it has this many.
    Chunked { input: usize, chunks: u64 },
    /// An input could not be read.
    Unreadable { input: usize, error: String },
    /// The server cannot be reached or refuses the client: the import stops.
    Fatal(String),
}

/// Send one unit. A transport failure or a refused token is fatal; anything the server
/// answered is in the outcome.
pub fn process(client: &mut Client, unit: Unit) -> Event {
    let (input, chunk, r) = match unit {
        Unit::Bundle { input, path, bytes } => (input, None, bundle(client, &path, bytes)),
        Unit::Chunk { input, chunk } => (input, Some(chunk.index), ndjson_chunk(client, &chunk)),
    };
    match r {
        Ok(outcome) => Event::Done {
            input,
            chunk,
            outcome,
        },
        Err(e) => Event::Fatal(format!("{e:#}")),
    }
}

/// The largest Bundle file sent: the server takes 16 MiB a request.
const MAX_BUNDLE_FILE: u64 = 16 << 20;

/// A Bundle file: checked to be a transaction or batch Bundle, then POSTed to the base as
/// it is (the bytes of the file).
fn bundle(client: &mut Client, path: &std::path::Path, bytes: u64) -> Result<Outcome> {
    let mut out = Outcome {
        bytes,
        ..Outcome::default()
    };
    if bytes > MAX_BUNDLE_FILE {
        out.errors.push(format!(
            "larger than {} MiB, more than a request to the server may carry (split it, or write it as NDJSON)",
            MAX_BUNDLE_FILE >> 20
        ));
        return Ok(out);
    }
    let body = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            out.errors.push(format!("cannot read it: {e}"));
            return Ok(out);
        }
    };
    let entries = match serde_json::from_slice::<Value>(&body) {
        Ok(v)
            if v["resourceType"] == "Bundle"
                && matches!(v["type"].as_str(), Some("transaction" | "batch")) =>
        {
            v["entry"].as_array().map_or(0, Vec::len)
        }
        Ok(_) => {
            out.errors
                .push("not a transaction or batch Bundle (NDJSON files end in .ndjson)".into());
            return Ok(out);
        }
        Err(e) => {
            out.errors.push(format!(
                "not JSON ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ));
            return Ok(out);
        }
    };
    let reply = client.post_json("", &body, &[])?;
    let labels: Vec<String> = (0..entries).map(|i| format!("entry {i}")).collect();
    tally(&mut out, reply.status, &reply.body, &labels);
    Ok(out)
}

/// An NDJSON chunk: one transaction (one commit on the server). If the server refuses it
/// for what it holds (one bad line fails the whole transaction, and the server validates
/// a batch whole too), its lines go again one request each (`PUT Type/id`, or `POST Type`
/// with `If-None-Exist`), so that the good lines load and each bad one is reported with
/// its number; every line is idempotent, so sending one twice changes nothing.
fn ndjson_chunk(client: &mut Client, chunk: &Chunk) -> Result<Outcome> {
    let (bundle, lines, refused) = ndjson::bundle_of(chunk, "transaction");
    let mut out = Outcome {
        bytes: chunk.bytes,
        errors: refused
            .into_iter()
            .map(|(n, why)| format!("line {n}: {why}"))
            .collect(),
        ..Outcome::default()
    };
    if lines.is_empty() {
        return Ok(out);
    }
    let reply = client.post_json("", &serde_json::to_vec(&bundle)?, &[])?;
    if !matches!(reply.status, 400 | 409 | 412 | 422) {
        let labels: Vec<String> = lines.iter().map(|n| format!("line {n}")).collect();
        tally(&mut out, reply.status, &reply.body, &labels);
        return Ok(out);
    }
    let entries = bundle["entry"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (line, entry) in lines.iter().zip(entries) {
        one_by_one(client, *line, entry, &mut out)?;
    }
    Ok(out)
}

/// One NDJSON line's entry as a request of its own.
fn one_by_one(client: &mut Client, line: usize, entry: &Value, out: &mut Outcome) -> Result<()> {
    let body = serde_json::to_vec(&entry["resource"])?;
    let url = entry["request"]["url"].as_str().unwrap_or_default();
    let reply = match entry["request"]["ifNoneExist"].as_str() {
        _ if entry["request"]["method"] == "PUT" => client.put_json(url, &body, &[])?,
        Some(criteria) => client.post_json(url, &body, &[("If-None-Exist", criteria)])?,
        None => client.post_json(url, &body, &[])?,
    };
    match reply.status {
        200..=299 => {
            out.resources += 1;
            out.created += u64::from(reply.status == 201);
        }
        code => out
            .errors
            .push(format!("line {line}: {code}: {}", diagnostics(&reply.body))),
    }
    Ok(())
}

/// Count a transaction- or batch-response's entries into `out`; an error status, or an
/// entry's, becomes an error naming the entry by `labels` and the server's diagnostics.
fn tally(out: &mut Outcome, status: u16, body: &Value, labels: &[String]) {
    if status != 200 {
        out.errors.push(format!(
            "the server answered {status}: {}",
            diagnostics(body)
        ));
        return;
    }
    let entries = body["entry"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, e) in entries.iter().enumerate() {
        let code: u16 = e["response"]["status"]
            .as_str()
            .and_then(|s| s.split_whitespace().next())
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        match code {
            200..=299 => {
                out.resources += 1;
                out.created += u64::from(code == 201);
            }
            _ => {
                let label = labels.get(i).map_or("an entry", String::as_str);
                let why = diagnostics(&e["response"]["outcome"]);
                out.errors.push(format!("{label}: {code}: {why}"));
            }
        }
    }
}

/// The diagnostics of an OperationOutcome (the server's outcomes carry no PHI), at most
/// 500 characters.
fn diagnostics(outcome: &Value) -> String {
    let issues = outcome["issue"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let text: Vec<String> = issues
        .iter()
        .filter_map(|i| {
            let text = i["diagnostics"]
                .as_str()
                .or_else(|| i["details"]["text"].as_str())
                .or_else(|| i["code"].as_str())?;
            Some(match i["expression"][0].as_str() {
                Some(path) => format!("{path}: {text}"),
                None => text.to_owned(),
            })
        })
        .collect();
    let text = if text.is_empty() {
        "no OperationOutcome".to_owned()
    } else {
        text.join("; ")
    };
    match text.char_indices().nth(500) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn responses_are_counted_and_failures_named_by_line() {
        let mut out = Outcome::default();
        let body = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"response": {"status": "201 Created"}},
            {"response": {"status": "200 OK"}},
            {"response": {"status": "400 Bad Request", "outcome": {"resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid", "diagnostics": "Patient.gender: unknown code"}]}}},
        ]});
        let labels = ["line 3", "line 4", "line 7"].map(str::to_owned);
        tally(&mut out, 200, &body, &labels);
        assert_eq!((out.resources, out.created), (2, 1));
        assert_eq!(out.errors, ["line 7: 400: Patient.gender: unknown code"]);

        let mut out = Outcome::default();
        let refused = json!({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "forbidden"},
            {"severity": "error", "code": "invalid", "details": {"text": "why"}}]});
        tally(&mut out, 403, &refused, &labels);
        assert_eq!(out.errors, ["the server answered 403: forbidden; why"]);
        assert_eq!(diagnostics(&Value::Null), "no OperationOutcome");
        let long = json!({"issue": [{"diagnostics": "é".repeat(600)}]});
        assert_eq!(diagnostics(&long).chars().count(), 501);
    }
}
