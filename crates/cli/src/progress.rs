//! Progress bars of long commands (`synth`, `import`), drawn on standard error only when it
//! is a terminal; hidden otherwise (scripts and logs get the commands' one-line summaries).

use std::io::IsTerminal as _;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

fn bar(len: u64, template: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// `synth`: patients written, time so far and ETA.
pub fn synth(patients: u64) -> ProgressBar {
    bar(
        patients,
        "synth [{bar:30}] {pos}/{len} patients, {elapsed} so far, ETA {eta}",
    )
}

/// `import`: bytes of input sent, rate and ETA; the message counts resources and files.
pub fn import(bytes: u64) -> ProgressBar {
    bar(
        bytes,
        "import [{bar:30}] {binary_bytes}/{binary_total_bytes}, {binary_bytes_per_sec}, ETA {eta}; {msg}",
    )
}

/// `restore`, `backup verify`: objects fetched and applied (hidden unless `show`).
pub fn restore(show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    bar(0, "restore [{bar:30}] {pos}/{len} {msg}, {elapsed}")
}

/// `backup now`: pages of the database copied.
pub fn snapshot() -> ProgressBar {
    bar(0, "snapshot [{bar:30}] {pos}/{len} pages, {elapsed}")
}

/// `export`: resources written, rate; the message counts types.
pub fn export() -> ProgressBar {
    bar(0, "export {pos} resources, {per_sec}, {elapsed}; {msg}")
}
