//! What the commands that act on an existing deployment share: finding it (its record, or flags
//! when the record is lost), the async runtime, durations, and confirmation prompts.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::Context;
use crate::cli::TargetArgs;
use crate::cloud::{self, Spec};
pub use crate::deployment::{connect, running_endpoint, stream, Deployment};
use crate::error::UserError;
use crate::output;
use crate::settings::{Layer, Settings, DEFAULT_NAME};
use crate::state::{cache_root, DeploymentDir};

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")
}

pub fn parse_duration(flag: &str, text: &str) -> Result<Duration, UserError> {
    humantime::parse_duration(text.trim())
        .map_err(|e| UserError::field(flag, format!("'{text}' is not a duration: {e}")).hint("write it like 90s, 20m or 1h"))
}

/// What the user gave for `target` (flags > SGBOX_* > -f file), the deployment name it comes to,
/// and that deployment's state folder.
pub fn locate(ctx: &Context, target: &TargetArgs) -> Result<(Layer, String, DeploymentDir)> {
    let given = ctx.given(target.pairs())?;
    let name = given.text("name").unwrap_or(DEFAULT_NAME).trim().to_string();
    let dir = ctx.deployment_dir(&name)?;
    Ok((given, name, dir))
}

/// The deployment `target` names. Its record's settings apply (see [`Settings::recorded`]); what
/// was given fills in only when the record is lost (cleaning up a box whose state is gone).
pub async fn open(ctx: &Context, target: &TargetArgs) -> Result<Deployment> {
    let (given, name, dir) = locate(ctx, target)?;
    let record = dir.record()?;
    let settings = match &record {
        Some(r) => {
            let (s, warnings) = Settings::recorded(&r.settings, &dir.record_path(), &given)?;
            for w in warnings {
                output::warn(w);
            }
            output::detail(format!("deployment \"{name}\": its record {} applies", dir.record_path().display()));
            s
        }
        None => Settings::resolve(&given).map_err(|e| {
            if e.field.as_deref() == Some("cloud") {
                UserError::field("name", format!("no deployment named \"{name}\" in {}", dir.path.parent().unwrap_or(Path::new(".")).display()))
                    .hint("check --name and --state-dir; to clean up a box whose state was lost, also pass --cloud (and --region)")
            } else {
                e
            }
        })?,
    };
    let machine = cloud::machine(&Spec::of(&settings), &dir.path, cache_root()?).await?;
    machine.check_home().await?;
    Ok(Deployment { settings, dir, record, machine })
}

/// Ask "Proceed? [y/N]" on the terminal after `explain` was printed; without a terminal, refuse
/// with `needs` (exit 2: pass --yes). `cancelled` ends the message when the answer is no.
pub fn confirm(needs: UserError, explain: impl FnOnce(), cancelled: &str) -> Result<()> {
    if !crate::prompt::available() {
        return Err(needs.into());
    }
    explain();
    if !crate::prompt::proceed("Proceed?")? {
        bail!("cancelled; {cancelled}");
    }
    Ok(())
}
