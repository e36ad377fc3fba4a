//! Commands: each takes the global context and resolved settings; only `main` knows about clap.

mod boxctl;
mod down;
mod history;
mod image;
mod logs;
mod plan;
mod render;
mod ssh;
mod status;
mod up;
mod upgrade;
mod versions;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{Cli, Command, DeploymentArgs, OutputFormat};
use crate::settings::{Layer, Prompter, Settings};

/// What every command may use from the global flags.
pub struct Context {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub output: OutputFormat,
    pub yes: bool,
    pub quiet: bool,
    pub verbose: u8,
}

impl Context {
    pub fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }

    /// Progress and notes for people: stderr, silenced by -q.
    pub fn note(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }

    pub fn warn(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("warning: {}", msg.as_ref());
        }
    }

    /// The state folder of deployment `name` under the state root.
    pub fn deployment_dir(&self, name: &str) -> Result<crate::state::DeploymentDir> {
        Ok(crate::state::DeploymentDir::new(&crate::state::state_root(self.state_dir.as_deref())?, name))
    }

    /// Resolve flags > SGBOX_* > sgbox.toml > prompt > defaults.
    pub fn settings(&self, args: &DeploymentArgs) -> Result<Settings> {
        let flags = Layer::from_flags(args.pairs());
        let env = Layer::from_env(|k| std::env::var(k).ok());
        let file = match &self.config {
            Some(p) => Layer::from_file(p)?,
            None => Layer::default(),
        };
        let prompter = Prompter::detect(self.yes, self.json());
        let s = Settings::resolve(&flags.over(env).over(file), &prompter)?;
        for w in s.warnings() {
            self.warn(w);
        }
        Ok(s)
    }

    /// Print a result document on stdout as pretty JSON, with a format version for consumers.
    pub fn print_json(&self, mut value: serde_json::Value) -> Result<()> {
        if let Some(o) = value.as_object_mut() {
            o.insert("format_version".into(), 1.into());
        }
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &value)?;
        writeln!(out)?;
        Ok(())
    }
}

pub fn run(cli: Cli) -> Result<()> {
    let ctx = Context {
        config: cli.config,
        state_dir: cli.state_dir,
        output: cli.output,
        yes: cli.yes,
        quiet: cli.quiet,
        verbose: cli.verbose,
    };
    match cli.command {
        Command::Render(a) => render::run(&ctx, a),
        Command::Plan(a) => plan::run(&ctx, a),
        Command::Versions(a) => versions::run(&ctx, a),
        Command::Up(a) => up::run(&ctx, a),
        Command::Status(a) => status::run(&ctx, a),
        Command::Down(a) => down::run(&ctx, a),
        Command::Ssh(a) => ssh::run(&ctx, a),
        Command::Logs(a) => logs::run(&ctx, a),
        Command::Image(a) => image::run(&ctx, a),
        Command::Upgrade(a) => upgrade::run(&ctx, a),
        Command::Rollback(a) => upgrade::rollback(&ctx, a),
        Command::History(a) => history::run(&ctx, a),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "sgbox", &mut std::io::stdout());
            Ok(())
        }
    }
}
