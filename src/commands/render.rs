//! `sgbox render --out DIR`: every file the box needs, written to a folder.
//!
//! Layout: `DIR/user-data` (the cloud-init), `DIR/sgbox.toml` (the resolved settings) and
//! `DIR/box/<path on the box>` for each file the cloud-init installs.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde_json::json;

use super::Context;
use crate::cli::RenderArgs;
use crate::output;
use crate::render::{self, Bundle};
use crate::settings::Settings;
use crate::state::write_atomic;

/// Render a deployment's files (creating its SSH key on first use).
pub fn bundle_for(ctx: &Context, s: &Settings) -> Result<Bundle> {
    crate::deployment::bundle(&ctx.deployment_dir(&s.name)?, s)
}

pub fn run(ctx: &Context, args: RenderArgs) -> Result<()> {
    let s = ctx.settings(&args.deployment)?;
    let b = bundle_for(ctx, &s)?;
    let out = &args.out;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    // No file holds a secret: the box makes its own passwords, and `up` sends a TLS key by SSH.
    let mut written: Vec<PathBuf> = Vec::new();
    let mut kept = Vec::new();
    write_atomic(&out.join("user-data"), b.user_data.as_bytes(), 0o644)?;
    written.push(out.join("user-data"));
    write_atomic(&out.join("sgbox.toml"), s.to_toml().as_bytes(), 0o644)?;
    written.push(out.join("sgbox.toml"));
    for f in &b.files {
        let dest = box_path(out, &f.path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        if f.create_only && dest.exists() {
            kept.push(dest);
            continue;
        }
        write_atomic(&dest, f.content.as_bytes(), f.mode)?;
        written.push(dest);
    }

    if output::json() {
        return output::result_json(json!({
            "deployment": s.name,
            "release": s.version.to_string(),
            "out": out,
            "written": written,
            "kept": kept,
            "user_data_bytes": b.user_data.len(),
            "rendered_sha256": b.rendered_sha256,
        }));
    }
    println!("Rendered Sourcegraph {} for \"{}\" ({}) into {}:", s.version, s.name, s.cloud, out.display());
    for p in &written {
        println!("  wrote {}", p.display());
    }
    for p in &kept {
        println!("  kept  {} (yours; never overwritten)", p.display());
    }
    if output::verbose() > 0 {
        output::note(format!("user-data: {} bytes; rendered files sha256 {}", b.user_data.len(), b.rendered_sha256));
    }
    if b.user_data.len() > render::AWS_USER_DATA_LIMIT {
        output::warn(format!("user-data is {} bytes, above the 16 KiB EC2 accepts", b.user_data.len()));
    }
    Ok(())
}

fn box_path(out: &Path, abs: &str) -> PathBuf {
    out.join("box").join(abs.trim_start_matches('/'))
}
