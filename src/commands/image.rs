//! `sgbox image build`: base images. Local: Debian 13 built offline (but for the package
//! mirror) with debootstrap, into the cache folder `up --cloud local` uses by default.

use anyhow::Result;
use serde_json::json;

use super::Context;
use crate::cli::{ImageArgs, ImageCommand};
use crate::cloud::{self, local::image, local::image::Built};
use crate::error::UserError;
use crate::output::{self, Phase};
use crate::settings::Cloud;
use crate::state::cache_root;

pub fn run(_ctx: &Context, args: ImageArgs) -> Result<()> {
    let ImageCommand::Build { cloud, out, mirror, force } = args.command;
    let cloud: Cloud = cloud.parse().map_err(|m| UserError::field("--cloud", m).hint("use aws, gcp or local"))?;
    let out = match out {
        Some(o) => o,
        None => cache_root()?.join("images").join(image::IMAGE_DIR_NAME),
    };
    let builder = cloud::image_builder(cloud, out.clone(), mirror, force)?;
    let p = Phase::start("local base image (Debian 13)");
    let built = match builder.build(&|m| output::note(format!("  {m}"))) {
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
    if output::json() {
        return output::result_json(json!({ "cloud": "local", "dir": out, "cached": cached, "image": m }));
    }
    println!("Local base image: {}", out.display());
    println!("  disk {} ({} MB), kernel boot `{}`", m.disk, m.disk_bytes / 1_000_000, m.cmdline);
    println!("  built {} in {:.0} s{}", m.built_at, m.build_seconds, if cached { " (reused)" } else { "" });
    println!("Use it: sgbox up --cloud local   (or --base-image {})", out.display());
    Ok(())
}
