//! sgbox: Sourcegraph in a box. `main` parses the command line, runs the command and maps errors
//! to exit codes: 2 for bad input (nothing was changed), 1 for everything else.

mod catalog;
mod cli;
mod commands;
mod error;
mod hostkeys;
mod journal;
mod planner;
mod pricing;
mod progress;
mod provider;
mod readiness;
mod render;
mod settings;
mod sizing;
mod ssh;
mod state;
mod version;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let json = cli.output == cli::OutputFormat::Json;
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = error::exit_code(&err);
            let msg = match err.chain().find_map(|c| c.downcast_ref::<error::UserError>()) {
                Some(u) => u.to_string(),
                None => format!("{err:#}"),
            };
            eprintln!("error: {msg}");
            if json {
                println!("{}", serde_json::json!({ "format_version": 1, "error": msg, "exit_code": code }));
            }
            ExitCode::from(code)
        }
    }
}
