//! The kinds of failure sgbox reports: a user error (bad config, flag, version, …) that exits
//! with code 2 having changed nothing, a question cancelled with Ctrl-C (130), and everything
//! else, which exits 1 with its context chain.

use std::fmt;

/// A mistake in what the user asked for. It names the field and says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserError {
    pub field: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl UserError {
    pub fn new(message: impl Into<String>) -> Self {
        UserError { field: None, message: message.into(), hint: None }
    }

    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        UserError { field: Some(field.into()), message: message.into(), hint: None }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "invalid {field}: {}", self.message)?,
            None => f.write_str(&self.message)?,
        }
        if let Some(h) = &self.hint {
            write!(f, "\n  fix: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for UserError {}

/// The user stopped a question with Ctrl-C (or Esc) before anything was created or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cancelled: nothing was created or written")
    }
}

impl std::error::Error for Interrupted {}

/// Exit code for an error: 130 (as for SIGINT) when the user cancelled a question, 2 when any
/// cause in the chain is a [`UserError`], else 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|c| c.downcast_ref::<Interrupted>().is_some()) {
        130
    } else if err.chain().any(|c| c.downcast_ref::<UserError>().is_some()) {
        2
    } else {
        1
    }
}
