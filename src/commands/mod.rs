//! Commands: each takes the global context and resolved settings; only `main` knows about clap.

mod admin;
pub mod boxctl;
mod down;
mod history;
mod image;
mod init;
mod logs;
mod plan;
mod render;
mod snapshots;
mod ssh;
mod status;
mod up;
mod upgrade;

mod versions;

use std::path::PathBuf;

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{Cli, Command, DeploymentArgs};
use crate::output;
use crate::settings::{Layer, Settings};

/// What every command may use from the global flags (output goes through [`crate::output`]).
pub struct Context {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub yes: bool,
}

impl Context {
    /// The state folder of deployment `name` under the state root.
    pub fn deployment_dir(&self, name: &str) -> Result<crate::state::DeploymentDir> {
        Ok(crate::state::DeploymentDir::new(&crate::state::state_root(self.state_dir.as_deref())?, name))
    }

    /// What this run was given, without defaults: flags > SGBOX_* > the -f file.
    pub fn given(&self, flags: Vec<(String, Option<String>)>) -> Result<Layer> {
        let flags = Layer::from_flags(flags.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let env = Layer::from_env(|k| std::env::var(k).ok());
        let file = match &self.config {
            Some(p) => Layer::from_file(p)?,
            None => Layer::default(),
        };
        Ok(flags.over(env).over(file))
    }

    /// Whether this run may ask questions: a terminal, no --yes, output for people.
    pub fn interactive(&self) -> bool {
        !self.yes && !output::json() && crate::prompt::available()
    }

    /// Settings for a new deployment, without questions: flags > SGBOX_* > sgbox.toml > defaults.
    pub fn settings(&self, args: &DeploymentArgs) -> Result<Settings> {
        let s = Settings::resolve(&self.given(args.pairs())?)?;
        for w in s.warnings() {
            output::warn(w);
        }
        Ok(s)
    }
}

/// Run the command; its exit code on success (`ssh` and `logs` pass the remote command's on).
pub fn run(cli: Cli) -> Result<u8> {
    let ctx = Context { config: cli.config, state_dir: cli.state_dir, yes: cli.yes };
    match cli.command {
        Command::Render(a) => render::run(&ctx, a),
        Command::Init(a) => init::run(&ctx, a),
        Command::Plan(a) => plan::run(&ctx, a),
        Command::Versions(a) => versions::run(&ctx, a),
        Command::Up(a) => up::run(&ctx, a),
        Command::Status(a) => status::run(&ctx, a),
        Command::Down(a) => down::run(&ctx, a),
        Command::Ssh(a) => return ssh::run(&ctx, a),
        Command::Logs(a) => return logs::run(&ctx, a),
        Command::Image(a) => image::run(&ctx, a),
        Command::Upgrade(a) => upgrade::run(&ctx, a),
        Command::Rollback(a) => upgrade::rollback(&ctx, a),
        Command::History(a) => history::run(&ctx, a),
        Command::Admin(a) => admin::run(&ctx, a),
        Command::Snapshots(a) => snapshots::run(&ctx, a),
        Command::IamPolicy { cloud, r#for } => {
            if cloud != "aws" {
                return Err(crate::error::UserError::field("cloud", format!("'{cloud}' has no IAM policy from sgbox"))
                    .hint("use --cloud aws (GCP comes with its own roles when it lands; the local cloud needs none)")
                    .into());
            }
            use crate::cloud::aws::policy;
            let of = match r#for {
                crate::cli::PolicyFor::Box => policy::For::Box,
                crate::cli::PolicyFor::ImageBuild => policy::For::ImageBuild,
            };
            println!("{}", serde_json::to_string_pretty(&policy::document(of))?);
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "sgbox", &mut std::io::stdout());
            Ok(())
        }
    }
    .map(|()| 0)
}
