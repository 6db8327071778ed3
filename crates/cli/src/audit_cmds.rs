//! Offline tools over a data directory: the audit log (scan, report, verify) and the blind indexes.

use std::path::Path;

use anyhow::{Context, Result};

use crate::datadir;
use crate::serve::vault_at;
use phivault_store::Store as _;

pub(crate) fn index_check(data_dir: &Path, min_resources: u64) -> Result<i32> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let opened = datadir::open(data_dir)?;
    let engine = phivault_records::Engine::new(opened.store.clone(), opened.keys.clone());
    let bits = engine.index_bits();
    let space = 2f64.powi(bits as i32);
    writeln!(
        out,
        "token width {bits} bits; band 2 <= C = R/2^{bits} <= sqrt(R); values are counted from the decrypted records"
    )?;
    writeln!(
        out,
        "index\tR\tC\tband\tvalues\tdistinct tokens\tmax values/token\tverdict"
    )?;
    let mut out_of_band = 0;
    for (index, st) in index_values(&engine)? {
        let r = st.resources as f64;
        let c = r / space;
        let hi = r.sqrt();
        let values = st.values.len();
        let max_per_token = st.per_token.values().map(|v| v.len()).max().unwrap_or(0);
        let few = values <= FEW_VALUES;
        let verdict = if st.resources < min_resources {
            "too few to judge".to_owned()
        } else if few && st.per_patient {
            format!(
                "FEW VALUES ({values}), keyed per patient: a written value recognises no other patient's"
            )
        } else if few {
            format!(
                "FEW VALUES ({values}): whoever can write one record per value and read the file recognises every record's value"
            )
        } else if c < 2.0 {
            out_of_band += 1;
            "BELOW band: tokens nearly unique, equal tokens likely mean equal values".to_owned()
        } else if c > hi {
            out_of_band += 1;
            "ABOVE band: tokens too coarse, searches decrypt many false candidates".to_owned()
        } else {
            "in band".to_owned()
        };
        writeln!(
            out,
            "{index}\t{}\t{c:.2}\t[2, {hi:.1}]\t{values}\t{}\t{max_per_token}\t{verdict}",
            st.resources,
            st.per_token.len(),
        )?;
    }
    opened.store.close();
    if out_of_band > 0 {
        writeln!(
            out,
            "index check: {out_of_band} index(es) outside the band for {bits}-bit tokens (plan --index-bits for the expected population)"
        )?;
        return Ok(1);
    }
    writeln!(out, "index check: OK")?;
    Ok(0)
}

/// An index with at most this many distinct values is reported as having few.
const FEW_VALUES: usize = 32;

/// What `index check` counts of one index, from the decrypted records.
#[derive(Default)]
struct IndexValues {
    resources: u64,
    per_patient: bool,
    values: std::collections::HashSet<Vec<u8>>,
    /// Global token → the distinct values (terms) that have it.
    per_token: std::collections::HashMap<Vec<u8>, std::collections::HashSet<Vec<u8>>>,
}

/// Every current record opened, its index terms counted: per index (`Type.param`).
fn index_values(
    engine: &phivault_records::Engine,
) -> Result<std::collections::BTreeMap<String, IndexValues>> {
    let mut all: std::collections::BTreeMap<String, IndexValues> = Default::default();
    for rtype in phivault_fhir::resource_types() {
        // (an erased patient's records do not open, and have no postings)
        engine
            .each_record(rtype, 500, &mut |records| {
                for (_, json) in records {
                    for (code, per_patient, terms) in engine.index_terms(rtype, &json) {
                        let st = all.entry(format!("{rtype}.{code}")).or_default();
                        st.resources += 1;
                        st.per_patient = per_patient;
                        for (token, term) in terms {
                            st.values.insert(term.clone());
                            st.per_token.entry(token).or_default().insert(term);
                        }
                    }
                }
                Ok(())
            })
            .map_err(|e| anyhow::anyhow!("the records could not be read: {e}"))?;
    }
    Ok(all)
}

/// `phivault audit scan`: the rules over the events after the last scanned position
/// (see `phivault_records::snoop::run`); prints what it raised.
pub(crate) fn audit_scan(
    opened: &datadir::Opened,
    hours: phivault_records::snoop::Hours,
) -> Result<i32> {
    // no listener: nothing is issued to the placeholder origin
    let vault = vault_at(opened, "https://localhost");
    let summary = phivault_records::snoop::run(&vault, hours)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(0)
}

/// `phivault audit report`: the events the filters pass, in log order.
pub(crate) fn audit_report(
    data_dir: &Path,
    filters: [(&str, Option<String>); 5],
    format: &str,
) -> Result<i32> {
    use phivault_records::report::{CSV_HEADER, Filter, csv_line, to_fhir};
    use std::io::Write as _;
    let query: Vec<String> = filters
        .iter()
        .filter_map(|(k, v)| {
            v.as_ref()
                .map(|v| format!("{k}={}", phivault_auth::percent_encode(v)))
        })
        .collect();
    let filter = Filter::parse(Some(&query.join("&"))).map_err(|e| {
        let why: Vec<&str> = e.issues.iter().map(|i| i.message.as_str()).collect();
        anyhow::anyhow!("invalid filter: {}", why.join("; "))
    })?;
    if format != "csv" && format != "json" {
        anyhow::bail!("--format is csv or json");
    }
    let store = datadir::read_only_store(data_dir)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if format == "csv" {
        writeln!(out, "{CSV_HEADER}")?;
    }
    let mut failed = None;
    store.scan_audit(&mut |s| {
        let e = match phivault_audit::AuditEvent::decode(&s.event) {
            Ok(e) => e,
            Err(_) => {
                failed = Some(s.seq);
                return false;
            }
        };
        if !filter.matches(&e) {
            return true;
        }
        let line = if format == "json" {
            to_fhir(s.seq, &e).to_string()
        } else {
            csv_line(s.seq, &e)
        };
        writeln!(out, "{line}").is_ok()
    })?;
    out.flush()?;
    if let Some(seq) = failed {
        eprintln!("phivault: the audit event at position {seq} does not decode; run audit verify");
        return Ok(1);
    }
    Ok(0)
}

pub(crate) fn audit_verify(data_dir: &Path, witness: Option<&Path>) -> Result<i32> {
    let d = datadir::DataDir::new(data_dir);
    let public = datadir::load_keys(&d)?.1.public_key();
    match check_audit_log(data_dir, witness, &public)? {
        Ok(report) => {
            println!("audit verify: OK: {report}");
            Ok(0)
        }
        Err(failure) => {
            println!("audit verify: FAILED: {failure}");
            Ok(1)
        }
    }
}

/// The audit log of `data_dir` checked with the audit key's public half: its chain,
/// signed head and checkpoints, and the witness file's checkpoints; a summary or the
/// failure.
pub(crate) fn check_audit_log(
    data_dir: &Path,
    witness: Option<&Path>,
    public: &[u8; 32],
) -> Result<Result<String, String>> {
    use phivault_audit::{StoredEvent, merkle::Checkpoint, verify};
    /// The data directory's store and the witness file, read as the verification asks.
    struct Files<'a> {
        store: phivault_store::AnyStore,
        witness: Option<&'a Path>,
    }
    impl verify::Source for Files<'_> {
        type Error = anyhow::Error;
        fn signed_head(&mut self) -> Result<Option<verify::SignedHead>> {
            Ok(self.store.audit_head()?.map(|h| verify::SignedHead {
                size: h.size,
                hash: h.hash,
                state: h.state,
                signature: h.signature,
            }))
        }
        fn stored_checkpoints(&mut self) -> Result<Vec<Checkpoint>> {
            Ok(self.store.audit_checkpoints(0, usize::MAX)?)
        }
        fn witness(&mut self) -> Result<Option<String>> {
            self.witness
                .map(|w| {
                    std::fs::read_to_string(w)
                        .with_context(|| format!("cannot read the witness file {}", w.display()))
                })
                .transpose()
        }
        fn scan(&mut self, visit: &mut dyn FnMut(StoredEvent) -> bool) -> Result<()> {
            Ok(self.store.scan_audit(visit)?)
        }
    }
    let store = datadir::read_only_store(data_dir)?;
    // every initialised data directory's log holds events (init writes its settings
    // through it): an empty one was emptied, with or without the rest of the store
    if store.audit_head()?.is_none() {
        return Ok(Err(if store.holds_data()? {
            "the store holds records or settings but has no audit log (the log was emptied)"
        } else {
            "the audit log is empty, and so is the store: an initialised data directory always holds events (the database was emptied or replaced)"
        }
        .to_owned()));
    }
    Ok(verify::verify_log(&mut Files { store, witness }, public)?
        .map(|r| r.to_string())
        .map_err(|f| f.to_string()))
}
