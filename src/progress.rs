//! Progress on stderr: an indicatif spinner per phase on a terminal, plain start/finish lines
//! otherwise (CI logs), nothing with -q. Results never go here; they go to stdout.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Phase {
    name: String,
    bar: Option<ProgressBar>,
    started: Instant,
    quiet: bool,
}

impl Phase {
    pub fn start(name: impl Into<String>, quiet: bool) -> Phase {
        let name = name.into();
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
