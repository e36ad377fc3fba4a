//! The one printer: results on stdout (text, or exactly one JSON document with `--output json`),
//! everything for people on stderr: progress phases (an indicatif spinner on a terminal, plain
//! start/finish lines in CI logs), notes and warnings (silenced by `-q`) and detail (shown with
//! `-v`).
//!
//! It is process-wide, set once by `main` from the global flags, like the terminal it writes to:
//! cloud, box and stack code call [`note`] or [`Phase::start`] without a `quiet` flag threaded to
//! them, so `-q` and `-v` hold everywhere.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How much goes to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Printer {
    pub json: bool,
    pub quiet: bool,
    pub verbose: u8,
}

static PRINTER: OnceLock<Printer> = OnceLock::new();
/// Whether this process printed its result document (JSON) already.
static RESULT_PRINTED: AtomicBool = AtomicBool::new(false);

/// Set the printer from the global flags (first call wins).
pub fn init(p: Printer) {
    let _ = PRINTER.set(p);
}

pub fn printer() -> Printer {
    PRINTER.get().copied().unwrap_or(Printer { json: false, quiet: false, verbose: 0 })
}

pub fn json() -> bool {
    printer().json
}

pub fn verbose() -> u8 {
    printer().verbose
}

/// Progress and notes for people: stderr, silenced by -q.
pub fn note(msg: impl AsRef<str>) {
    if !printer().quiet {
        eprintln!("{}", msg.as_ref());
    }
}

/// Something legal but unwise, or a fallback taken: stderr, silenced by -q.
pub fn warn(msg: impl AsRef<str>) {
    if !printer().quiet {
        eprintln!("warning: {}", msg.as_ref());
    }
}

/// Detail for `-v`: which record applies, how the host key is checked.
pub fn detail(msg: impl AsRef<str>) {
    at_verbosity(1, msg.as_ref());
}

/// Detail for `-vv`: each command run on the box.
pub fn trace(msg: impl AsRef<str>) {
    at_verbosity(2, msg.as_ref());
}

fn at_verbosity(level: u8, msg: &str) {
    let p = printer();
    if p.verbose >= level && !p.quiet {
        eprintln!("{msg}");
    }
}

/// The command's result document on stdout, as pretty JSON with a format version. A process
/// prints at most one: a second call is refused, so stdout always parses as one document.
pub fn result_json(value: serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    write_result(&mut out, value)
}

fn write_result(out: &mut dyn Write, mut value: serde_json::Value) -> anyhow::Result<()> {
    if RESULT_PRINTED.swap(true, Ordering::SeqCst) {
        anyhow::bail!("internal error: a second result document was about to be printed");
    }
    if let Some(o) = value.as_object_mut() {
        o.insert("format_version".into(), 1.into());
    }
    serde_json::to_writer_pretty(&mut *out, &value)?;
    writeln!(out)?;
    Ok(())
}

/// The error document `main` prints for a failed command with `--output json`, unless the
/// command already printed its result (which then carries the error itself).
pub fn error_json(out: &mut dyn Write, msg: &str, code: u8) {
    if RESULT_PRINTED.swap(true, Ordering::SeqCst) {
        return;
    }
    let doc = serde_json::json!({ "format_version": 1, "error": msg, "exit_code": code });
    let _ = writeln!(out, "{doc}");
}

/// One step of a long command, shown while it runs and with its duration when it ends.
pub struct Phase {
    name: String,
    bar: Option<ProgressBar>,
    started: Instant,
    quiet: bool,
}

impl Phase {
    pub fn start(name: impl Into<String>) -> Phase {
        let name = name.into();
        let quiet = printer().quiet;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(ProgressStyle::with_template("{spinner} {prefix} {wide_msg} [{elapsed}]").expect("static template"));
            b.set_prefix(name.clone());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        if bar.is_none() && !quiet {
            eprintln!("… {name}");
        }
        Phase { name, bar, started: Instant::now(), quiet }
    }

    /// The current detail, e.g. "12/29 services healthy".
    pub fn set(&self, msg: impl Into<String>) {
        if let Some(b) = &self.bar {
            b.set_message(msg.into());
        }
    }

    /// A handle that sets the detail from another thread (a command watched on the box).
    pub fn setter(&self) -> impl Fn(String) + Send + Sync + 'static {
        let bar = self.bar.clone();
        move |msg| {
            if let Some(b) = &bar {
                b.set_message(msg);
            }
        }
    }

    fn end(self, mark: &str, detail: &str) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        let line = format!("{mark} {} ({secs:.1} s){detail}", self.name);
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
        if !self.quiet {
            eprintln!("{line}");
        }
        secs
    }

    pub fn done(self) -> f64 {
        self.end("✓", "")
    }

    pub fn done_with(self, detail: &str) -> f64 {
        let d = format!(": {detail}");
        self.end("✓", &d)
    }

    pub fn fail(self) -> f64 {
        self.end("✗", "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdout_carries_one_document_even_when_the_command_fails_after_its_result() {
        // `down` prints what it deleted and then fails because something remains: main's error
        // document must not follow the result on stdout.
        let mut out = Vec::new();
        write_result(&mut out, serde_json::json!({ "deleted": [], "error": "these still exist: x" })).unwrap();
        error_json(&mut out, "these still exist: x", 1);
        let text = String::from_utf8(out).unwrap();
        let docs: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&text).into_iter().collect::<Result<_, _>>().unwrap();
        assert_eq!(docs.len(), 1, "{text}");
        assert_eq!(docs[0]["format_version"], 1);
        assert!(write_result(&mut Vec::new(), serde_json::json!({})).is_err(), "a second result is refused");
    }
}
