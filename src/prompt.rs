//! The terminal side of questions: inquire's prompts (arrow-key lists, defaults, validation that
//! asks again, Ctrl-C) behind the wizard's [`Ask`], and the yes/no confirmation of commands that
//! delete or replace something. Plain rendering when NO_COLOR is set or TERM is dumb.

use std::io::IsTerminal;

use inquire::error::InquireError;
use inquire::ui::RenderConfig;
use inquire::validator::Validation;
use inquire::{Confirm, Select, Text};

use crate::error::Interrupted;
use crate::settings::wizard::{Ask, Check, Choice};

/// Whether questions may be asked: stdin and stderr (where they are drawn) are a terminal.
pub fn available() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

fn render() -> RenderConfig<'static> {
    let plain = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()) || std::env::var("TERM").is_ok_and(|t| t == "dumb");
    if plain {
        RenderConfig::empty()
    } else {
        RenderConfig::default_colored()
    }
}

fn answered<T>(r: Result<T, InquireError>) -> anyhow::Result<T> {
    match r {
        Ok(v) => Ok(v),
        Err(InquireError::OperationCanceled | InquireError::OperationInterrupted) => Err(Interrupted.into()),
        Err(e) => Err(anyhow::anyhow!("the terminal could not ask: {e}")),
    }
}

/// Questions on this process's terminal.
pub struct Terminal {
    render: RenderConfig<'static>,
}

impl Terminal {
    pub fn new() -> Terminal {
        Terminal { render: render() }
    }
}

impl Ask for Terminal {
    fn select(&mut self, message: &str, help: &str, choices: &[Choice], default: usize) -> anyhow::Result<usize> {
        let labels: Vec<String> = choices.iter().map(|c| c.label.clone()).collect();
        let help = if help.is_empty() { "↑↓ to move, Enter to pick".to_string() } else { format!("{help} · ↑↓ Enter") };
        // Once answered, the line keeps the value, not the whole label.
        let short = |o: inquire::list_option::ListOption<&String>| o.value.split("  ").next().unwrap_or(o.value).trim().to_string();
        let picked = Select::new(message, labels)
            .with_formatter(&short)
            .with_starting_cursor(default)
            .with_help_message(&help)
            .with_page_size(8)
            .with_render_config(self.render)
            .raw_prompt();
        Ok(answered(picked)?.index)
    }

    fn text(&mut self, message: &str, help: &str, default: Option<&str>, check: Check) -> anyhow::Result<String> {
        let validator = move |t: &str| -> Result<Validation, inquire::CustomUserError> {
            Ok(match check(t) {
                Ok(()) => Validation::Valid,
                Err(m) => Validation::Invalid(m.into()),
            })
        };
        let mut q = Text::new(message).with_render_config(self.render).with_validator(validator);
        if !help.is_empty() {
            q = q.with_help_message(help);
        }
        if let Some(d) = default {
            q = q.with_default(d);
        }
        answered(q.prompt())
    }

    fn confirm(&mut self, message: &str, help: &str, default: bool) -> anyhow::Result<bool> {
        let mut q = Confirm::new(message).with_default(default).with_render_config(self.render);
        if !help.is_empty() {
            q = q.with_help_message(help);
        }
        answered(q.prompt())
    }

    fn say(&mut self, line: &str) {
        eprintln!("{line}");
    }
}

/// "Proceed?" for a command about to delete or replace something: no unless the user says yes.
pub fn proceed(message: &str) -> anyhow::Result<bool> {
    Terminal::new().confirm(message, "", false)
}
