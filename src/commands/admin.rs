//! `sgbox admin`: the site admin `up` created (username, email, password, where to sign in).
//! The password is printed only here, only when asked. Local only: it calls no cloud.

use anyhow::Result;
use serde_json::json;

use super::Context;
use crate::cli::TargetArgs;
use crate::error::UserError;
use crate::output;

pub fn run(ctx: &Context, args: TargetArgs) -> Result<()> {
    let (_, name, dir) = super::boxctl::locate(ctx, &args)?;
    let admin = dir.admin()?.filter(|a| a.claimed_at.is_some()).ok_or_else(|| {
        UserError::field("name", format!("\"{name}\" has no site admin created by sgbox (in {})", dir.path.display()))
            .hint("check --name and --state-dir; `sgbox up` creates the admin once Sourcegraph answers")
    })?;
    let url = dir.record()?.and_then(|r| r.url);
    if output::json() {
        return output::result_json(json!({
            "name": name, "url": url, "username": admin.username, "email": admin.email, "password": admin.password, "claimed_at": admin.claimed_at,
        }));
    }
    if let Some(u) = &url {
        println!("Sign in at {u}/sign-in");
    }
    println!("  username: {}", admin.username);
    println!("  email:    {}  (a placeholder: change it in your user settings)", admin.email);
    println!("  password: {}", admin.password);
    Ok(())
}
