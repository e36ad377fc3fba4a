//! `sgbox history`: what the state folder records of a box: each `up` that reached a healthy
//! release and each upgrade (when, from, to, by whom). Local only: it calls no cloud.

use anyhow::Result;
use serde_json::json;

use super::Context;
use crate::cli::TargetArgs;
use crate::error::UserError;
use crate::output;

pub fn run(ctx: &Context, args: TargetArgs) -> Result<()> {
    let (_, name, dir) = super::boxctl::locate(ctx, &args)?;
    let Some(r) = dir.record()? else {
        return Err(UserError::field("name", format!("no deployment named \"{name}\" in {}", dir.path.display()))
            .hint("check --name and --state-dir")
            .into());
    };
    if output::json() {
        return output::result_json(
            json!({ "name": r.name, "cloud": r.cloud, "release": r.release, "created_at": r.created_at, "history": r.history }),
        );
    }
    println!("{} ({}), created {}, now at {}", r.name, r.cloud, r.created_at, r.release);
    if r.history.is_empty() {
        println!("  (no completed deployment yet)");
    }
    for h in &r.history {
        match &h.from {
            Some(f) => println!("  {}  {:<8} {f} -> {}  by {}", h.at, h.action, h.release, h.by),
            None => println!("  {}  {:<8} {}  by {}", h.at, h.action, h.release, h.by),
        }
    }
    Ok(())
}
