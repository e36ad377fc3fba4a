//! `sgbox image build`: base images. Local: Debian 13 built offline (but for the package
//! mirror) with debootstrap, into the cache folder `up --cloud local` uses by default.

use anyhow::Result;
use serde_json::json;

use super::Context;
use crate::cli::{ImageArgs, ImageCommand};
use crate::error::UserError;
use crate::progress::Phase;
use crate::provider::local::image::{self, BuildOptions, Built};
use crate::settings::Cloud;
use crate::state::cache_root;

pub fn run(ctx: &Context, args: ImageArgs) -> Result<()> {
    let ImageCommand::Build { cloud, out, mirror, force } = args.command;
    let cloud: Cloud = cloud.parse().map_err(|m| UserError::field("--cloud", m).hint("use aws, gcp or local"))?;
    if cloud != Cloud::Local {
        return Err(UserError::field("--cloud", format!("image build for {cloud} is not available in this build yet")).hint("use --cloud local").into());
    }
    let out = match out {
        Some(o) => o,
        None => cache_root()?.join("images").join(image::IMAGE_DIR_NAME),
    };
    let opts = BuildOptions { out: out.clone(), mirror: mirror.unwrap_or_else(image::host_mirror), force };
    let p = Phase::start("local base image (Debian 13)", ctx.quiet);
    let quiet = ctx.quiet;
    let built = match image::build(&opts, &|m| {
        if !quiet {
            eprintln!("  {m}");
        }
    }) {
        Ok(b) => b,
        Err(e) => {
            p.fail();
            return Err(e);
        }
    };
    let (m, cached) = match built {
        Built::Fresh(m) => (m, false),
        Built::Cached(m) => (m, true),
    };
    p.done_with(if cached { "already built (same recipe)" } else { "built" });
    if ctx.json() {
        return ctx.print_json(json!({ "cloud": "local", "dir": out, "cached": cached, "image": m }));
    }
    println!("Local base image: {}", out.display());
    println!("  disk {} ({} MB), kernel boot `{}`", m.disk, m.disk_bytes / 1_000_000, m.cmdline);
    println!("  built {} in {:.0} s{}", m.built_at, m.build_seconds, if cached { " (reused)" } else { "" });
    println!("Use it: sgbox up --cloud local   (or --base-image {})", out.display());
    Ok(())
}
