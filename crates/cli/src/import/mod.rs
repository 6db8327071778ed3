//! `phivault import`: load data into a running server through its FHIR API, as a
//! SMART Backend Services client (the credentials file of `client add`).
//!
//! Inputs are files or directories (a directory's `*.json` and `*.ndjson` files, sorted by
//! name, not recursing): transaction or batch Bundles (`.json`, POSTed to the base as they
//! are) and NDJSON (`.ndjson` or `.jsonl`, one resource a line, sent in chunks: see
//! [`ndjson`]). `--jobs` workers send them concurrently (sharing one connection pool and
//! one access token, renewed before it expires).
//!
//! **Resuming.** The resume file ([`resume`]; by default `NAME.phivault-import.json`
//! beside the first input `NAME`) records every input and NDJSON chunk the server
//! acknowledged whole; a rerun of the same command skips them. The file is replaced
//! atomically, so a kill (`kill -9`, Ctrl-C) at any moment leaves it consistent. A unit the
//! server committed just before the kill, but that the file does not record yet, is sent
//! again: that adds nothing when the data is idempotent — NDJSON lines are `PUT Type/id`
//! or conditional creates, and `phivault synth` bundles create each resource only if its
//! synth identifier is absent (`ifNoneExist`). Bundles of plain `POST`s from elsewhere have
//! no such protection.
//!
//! **Errors.** A unit the server refuses (a 4xx/5xx OperationOutcome, or failed entries
//! of a batch) is reported with its file (and entry or line) and the server's diagnostics —
//! never resource content — and is not recorded; the others go on, and the command exits 1
//! at the end. A server that cannot be reached, or refuses the client's token, stops the
//! import (exit 2): what was acknowledged is recorded, and a rerun resumes.
//!
//! **Progress** is drawn on standard error when it is a terminal (bytes of input, rate,
//! ETA, resources); a one-line summary ends the command in any case.

mod ndjson;
mod resume;
mod work;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::fhir_client::{Client, Credentials};
use resume::{Identity, Resume};
use work::{Event, Outcome, Unit};

/// The resume file's name is the first input's with this appended; a directory's listing
/// skips files ending in it.
const RESUME_SUFFIX: &str = ".phivault-import.json";

/// The arguments of `phivault import`.
pub struct Options {
    pub client: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub jobs: usize,
    pub resume: Option<PathBuf>,
    pub paths: Vec<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bundle,
    Ndjson,
}

/// One input file.
struct Input {
    /// As the user named it (for messages).
    shown: PathBuf,
    /// Its canonical path (the resume file's key).
    key: String,
    id: Identity,
    kind: Kind,
}

/// Run the import; the exit code is 0 when every input loaded, 1 when some failed.
pub fn run(opts: Options) -> Result<i32> {
    if !(1..=64).contains(&opts.jobs) {
        bail!("--jobs is 1 to 64");
    }
    let client = Client::new(
        Credentials::load(&opts.client)?,
        None,
        opts.ca_file.as_deref(),
    )?;
    let first = opts
        .paths
        .first()
        .context("name at least one file or directory to import")?;
    let resume_path = opts
        .resume
        .clone()
        .unwrap_or_else(|| default_resume_path(first));
    let resume_key = std::fs::canonicalize(&resume_path).ok();
    let inputs: Vec<Input> = collect_inputs(&opts.paths)?
        .into_iter()
        .filter(|i| resume_key.as_deref() != Some(Path::new(&i.key)))
        .collect();
    if inputs.is_empty() {
        bail!("no .json or .ndjson files among the paths given");
    }
    let chunking = (ndjson::CHUNK_LINES as u64, ndjson::CHUNK_BYTES as u64);
    let (resume, note) = Resume::open(&resume_path, client.fhir_base(), chunking)?;
    if let Some(note) = note {
        eprintln!("phivault import: {note}");
    }
    // fail fast on credentials the server refuses, before any work is handed out
    client.clone().token()?;
    let mut run = Run::new(inputs, resume, opts.jobs);
    run.go(client)?;
    let fatal = run.fatal.take();
    let code = run.finish();
    match fatal {
        Some(e) => bail!(
            "{e}; the import stopped: what the server acknowledged is recorded, run the same \
             command again to resume"
        ),
        None => Ok(code),
    }
}

/// `NAME.phivault-import.json` beside the first input `NAME` (file or directory).
fn default_resume_path(first: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(first).unwrap_or_else(|_| first.to_owned());
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => dir.join(format!("{}{RESUME_SUFFIX}", name.to_string_lossy())),
        _ => PathBuf::from(format!("import{RESUME_SUFFIX}")),
    }
}

/// The input files the paths name, each once, in the order given (a directory's sorted).
fn collect_inputs(paths: &[PathBuf]) -> Result<Vec<Input>> {
    let mut files = Vec::new();
    for p in paths {
        let meta =
            std::fs::metadata(p).with_context(|| format!("cannot import {}", p.display()))?;
        if !meta.is_dir() {
            files.push(p.clone());
            continue;
        }
        let mut listed: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("cannot list {}", p.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        listed.retain(|f| {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name.ends_with(".json") || name.ends_with(".ndjson"))
                && !name.ends_with(RESUME_SUFFIX)
                && f.is_file()
        });
        listed.sort();
        files.extend(listed);
    }
    let mut seen = BTreeSet::new();
    let mut inputs = Vec::with_capacity(files.len());
    for f in files {
        let key = std::fs::canonicalize(&f)
            .with_context(|| format!("cannot import {}", f.display()))?
            .to_string_lossy()
            .into_owned();
        if !seen.insert(key.clone()) {
            continue;
        }
        let ext = f
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        let kind = match ext.as_deref() {
            Some("ndjson" | "jsonl") => Kind::Ndjson,
            _ => Kind::Bundle,
        };
        let id = Identity::of(&f)?;
        inputs.push(Input {
            shown: f,
            key,
            id,
            kind,
        });
    }
    Ok(inputs)
}

/// The state of one import run (the main thread's).
struct Run {
    inputs: Vec<Input>,
    resume: Resume,
    jobs: usize,
    /// Per input: it failed somewhere; for NDJSON, its number of chunks once known.
    failed: Vec<bool>,
    chunks: Vec<Option<u64>>,
    /// Inputs recorded whole in an earlier run, and in this one.
    skipped: usize,
    loaded: usize,
    totals: Outcome,
    bar: indicatif::ProgressBar,
    started: Instant,
    fatal: Option<String>,
}

impl Run {
    fn new(inputs: Vec<Input>, resume: Resume, jobs: usize) -> Run {
        let n = inputs.len();
        let skipped = inputs
            .iter()
            .filter(|i| resume.file_done(&i.key, i.id))
            .count();
        let bytes = inputs
            .iter()
            .filter(|i| !resume.file_done(&i.key, i.id))
            .map(|i| i.id.size)
            .sum();
        Run {
            inputs,
            resume,
            jobs,
            failed: vec![false; n],
            chunks: vec![None; n],
            skipped,
            loaded: 0,
            totals: Outcome::default(),
            bar: crate::progress::import(bytes),
            started: Instant::now(),
            fatal: None,
        }
    }

    /// Hand out the work to the workers and record what they report until all is done.
    fn go(&mut self, client: Client) -> Result<()> {
        let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<Unit>(self.jobs * 2);
        let (event_tx, event_rx) = std::sync::mpsc::channel::<Event>();
        let stop = Arc::new(AtomicBool::new(false));
        let work_rx = Arc::new(Mutex::new(work_rx));
        let mut threads = Vec::with_capacity(self.jobs + 1);
        for _ in 0..self.jobs {
            let (mut client, rx, tx, stop) = (
                client.clone(),
                work_rx.clone(),
                event_tx.clone(),
                stop.clone(),
            );
            threads.push(std::thread::spawn(move || {
                worker(&mut client, &rx, &tx, &stop)
            }));
        }
        let plan: Vec<(usize, PathBuf, Kind, u64, BTreeSet<u64>)> = self
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, i)| !self.resume.file_done(&i.key, i.id))
            .map(|(n, i)| {
                (
                    n,
                    i.shown.clone(),
                    i.kind,
                    i.id.size,
                    self.resume.chunks_done(&i.key, i.id),
                )
            })
            .collect();
        {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                produce(plan, &work_tx, &event_tx, &stop)
            }));
        }
        let r = self.listen(&event_rx, &stop);
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            let _ = t.join();
        }
        // the workers may have reported more while stopping
        while let Ok(ev) = event_rx.try_recv() {
            self.on_event(ev);
        }
        self.resume.flush()?;
        r
    }

    fn listen(&mut self, events: &Receiver<Event>, stop: &AtomicBool) -> Result<()> {
        while let Ok(ev) = events.recv() {
            self.on_event(ev);
            if self.fatal.is_some() {
                stop.store(true, Ordering::Relaxed);
            }
            self.resume.maybe_flush()?;
        }
        Ok(())
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Done {
                input,
                chunk,
                outcome,
            } => self.on_done(input, chunk, outcome),
            Event::Skipped { bytes } => self.bar.inc(bytes),
            Event::Chunked { input, chunks } => {
                self.chunks[input] = Some(chunks);
                self.maybe_complete(input);
            }
            Event::Unreadable { input, error } => {
                self.report(input, &[format!("cannot read it: {error}")]);
            }
            Event::Fatal(e) => {
                self.fatal.get_or_insert(e);
            }
        }
    }

    fn on_done(&mut self, input: usize, chunk: Option<u64>, outcome: Outcome) {
        self.bar.inc(outcome.bytes);
        self.totals.resources += outcome.resources;
        self.totals.created += outcome.created;
        if !outcome.errors.is_empty() {
            self.report(input, &outcome.errors);
        } else {
            let i = &self.inputs[input];
            match chunk {
                None => {
                    self.resume.record_file(&i.key, i.id);
                    self.loaded += 1;
                }
                Some(c) => {
                    self.resume.record_chunk(&i.key, i.id, c);
                    self.maybe_complete(input);
                }
            }
        }
        let r = self.totals.resources;
        let rate = r as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        let files = self.loaded + self.skipped;
        let n = self.inputs.len();
        self.bar
            .set_message(format!("{r} resources ({rate:.0}/s), {files} of {n} files"));
    }

    /// Record an NDJSON input whole once all its chunks are.
    fn maybe_complete(&mut self, input: usize) {
        let i = &self.inputs[input];
        if let Some(total) = self.chunks[input]
            && !self.failed[input]
            && self.resume.chunks_done(&i.key, i.id).len() as u64 == total
        {
            self.resume.record_file(&i.key, i.id);
            self.loaded += 1;
        }
    }

    fn report(&mut self, input: usize, errors: &[String]) {
        self.failed[input] = true;
        self.totals.errors.extend(errors.iter().cloned());
        let shown = self.inputs[input].shown.display().to_string();
        self.bar.suspend(|| {
            for e in errors {
                eprintln!("phivault import: {shown}: {e}");
            }
        });
    }

    /// The one-line summary; the exit code.
    fn finish(self) -> i32 {
        self.bar.finish_and_clear();
        let secs = self.started.elapsed().as_secs_f64();
        let failed = self.failed.iter().filter(|f| **f).count();
        let t = &self.totals;
        let skipped = match self.skipped {
            0 => String::new(),
            n => format!(", {n} skipped (done before)"),
        };
        eprintln!(
            "phivault import: {} of {} inputs loaded{skipped}, {failed} failed; {} resources \
             ({} created, {} already there or updated) in {secs:.1} s ({:.1} resources/s); \
             resume file {}",
            self.loaded,
            self.inputs.len(),
            t.resources,
            t.created,
            t.resources - t.created,
            t.resources as f64 / secs.max(0.001),
            self.resume.path().display(),
        );
        i32::from(failed > 0)
    }
}

/// A worker: send units until the work runs out; once stopped, drop what is left.
fn worker(
    client: &mut Client,
    work: &Mutex<Receiver<Unit>>,
    events: &Sender<Event>,
    stop: &AtomicBool,
) {
    loop {
        let unit = match work.lock().map(|rx| rx.recv()) {
            Ok(Ok(unit)) => unit,
            _ => return,
        };
        if stop.load(Ordering::Relaxed) {
            continue;
        }
        if events.send(work::process(client, unit)).is_err() {
            return;
        }
    }
}

/// The producer: Bundle files as they are, NDJSON files cut into chunks (those done in an
/// earlier run skipped), in input order.
fn produce(
    plan: Vec<(usize, PathBuf, Kind, u64, BTreeSet<u64>)>,
    work: &SyncSender<Unit>,
    events: &Sender<Event>,
    stop: &AtomicBool,
) {
    for (input, path, kind, bytes, done) in plan {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let sent = match kind {
            Kind::Bundle => work.send(Unit::Bundle { input, path, bytes }).is_ok(),
            Kind::Ndjson => produce_chunks(input, &path, &done, work, events, stop),
        };
        if !sent {
            return;
        }
    }
}

/// Hand out one NDJSON file's chunks; false when the import is stopping.
fn produce_chunks(
    input: usize,
    path: &Path,
    done: &BTreeSet<u64>,
    work: &SyncSender<Unit>,
    events: &Sender<Event>,
    stop: &AtomicBool,
) -> bool {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            return events
                .send(Event::Unreadable {
                    input,
                    error: e.to_string(),
                })
                .is_ok();
        }
    };
    let mut count = 0;
    for chunk in ndjson::Chunks::new(std::io::BufReader::with_capacity(1 << 20, file)) {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let sent = match chunk {
            Err(e) => {
                return events
                    .send(Event::Unreadable {
                        input,
                        error: e.to_string(),
                    })
                    .is_ok();
            }
            Ok(c) if done.contains(&c.index) => {
                events.send(Event::Skipped { bytes: c.bytes }).is_ok()
            }
            Ok(chunk) => work.send(Unit::Chunk { input, chunk }).is_ok(),
        };
        if !sent {
            return false;
        }
        count += 1;
    }
    events
        .send(Event::Chunked {
            input,
            chunks: count,
        })
        .is_ok()
}
