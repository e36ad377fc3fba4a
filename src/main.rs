//! sgbox: Sourcegraph in a box. `main` parses the command line, runs the command and maps errors
//! to exit codes: 2 for bad input (nothing was changed), 1 for everything else.

mod cli;
mod cloud;
mod commands;
mod deployment;
mod error;
mod onbox;
mod output;
mod prompt;
mod release;
mod render;
mod settings;
mod stack;
mod state;
#[cfg(test)]
mod testkit;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let json = cli.output == cli::OutputFormat::Json;
    output::init(output::Printer { json, quiet: cli.quiet, verbose: cli.verbose });
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let code = error::exit_code(&err);
            let msg = match err.chain().find_map(|c| c.downcast_ref::<error::UserError>()) {
                Some(u) => u.to_string(),
                None => format!("{err:#}"),
            };
            eprintln!("error: {msg}");
            if json {
                output::error_json(&mut std::io::stdout(), &msg, code);
            }
            ExitCode::from(code)
        }
    }
}
