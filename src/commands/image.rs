//! `sgbox image build`: machine images. AWS: an AMI with a Sourcegraph release baked in
//! (`cloud::aws::image`, from the pure `cloud::image_spec`), copied and published as asked, and
//! a manifest of what exists where. Local: Debian 13 built offline (but for the package mirror)
//! with debootstrap, into the cache folder `up --cloud local` uses by default.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use serde_json::json;

use super::boxctl::{parse_duration, runtime};
use super::Context;
use crate::cli::{ImageArgs, ImageCommand};
use crate::cloud::aws::image::AwsImages;
use crate::cloud::image_spec::{ImageRequest, ImageSpec};
use crate::cloud::{self, local::image, local::image::Built};
use crate::error::UserError;
use crate::output::{self, Phase};
use crate::settings::{Cloud, Layer, Settings};
use crate::state::cache_root;

pub fn run(_ctx: &Context, args: ImageArgs) -> Result<()> {
    let ImageCommand::Build {
        cloud,
        out,
        mirror,
        force,
        version,
        region,
        copy_to,
        public,
        unencrypted,
        dry_run,
        timeout,
        registry_mirror,
        mirror_mode,
    } = args.command;
    let registry = (registry_mirror, mirror_mode);
    let cloud: Cloud = cloud.parse().map_err(|m| UserError::field("--cloud", m).hint("use aws, gcp or local"))?;
    if cloud == Cloud::Aws {
        if out.is_some() || mirror.is_some() || force {
            return Err(UserError::field("--out", "--out, --mirror and --force are for --cloud local")
                .hint("drop them; an AMI is found again by its recipe, so a re-run builds nothing twice")
                .into());
        }
        let timeout = parse_duration("--timeout", &timeout)?;
        return aws(version, region, copy_to, (public, unencrypted), dry_run, timeout, registry);
    }
    if cloud == Cloud::Local && (region.is_some() || !copy_to.is_empty() || public || unencrypted || dry_run) {
        return Err(UserError::field("--region", "--region, --copy-to, --public, --unencrypted and --dry-run are for --cloud aws")
            .hint("a local image stays on this machine: `sgbox image build --cloud local [--version X --registry-mirror URL]`")
            .into());
    }
    let timeout = parse_duration("--timeout", &timeout)?;
    // With --version, --out names the baked image (default: beside the base image, named by the
    // recipe); the base image is the cached one. Without, --out names the base image.
    let base_dir = cache_root()?.join("images").join(image::IMAGE_DIR_NAME);
    let (base_out, baked_out) = match version {
        Some(_) => (base_dir, out),
        None => (out.unwrap_or(base_dir), None),
    };
    let builder = cloud::image_builder(cloud, base_out.clone(), mirror, force)?;
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
    if let Some(v) = version {
        return local_bake(&base_out, &m, baked_out, &v, registry, timeout);
    }
    if output::json() {
        return output::result_json(json!({ "cloud": "local", "dir": base_out, "cached": cached, "image": m }));
    }
    println!("Local base image: {}", base_out.display());
    println!("  disk {} ({} MB), kernel boot `{}`", m.disk, m.disk_bytes / 1_000_000, m.cmdline);
    println!("  built {} in {:.0} s{}", m.built_at, m.build_seconds, if cached { " (reused)" } else { "" });
    println!("Use it: sgbox up --cloud local   (or --base-image {})", base_out.display());
    Ok(())
}

/// Settings of the image's boxes: the release, the region and the registry, checked as `up`
/// checks them.
fn image_settings(
    cloud: &str,
    version: Option<String>,
    region: Option<String>,
    (mirror, mode): (Option<String>, Option<String>),
) -> Result<Settings, UserError> {
    Settings::resolve(&Layer::from_flags([
        ("cloud", Some(cloud.to_string())),
        ("version", version),
        ("region", region),
        ("registry-mirror", mirror),
        ("mirror-mode", mode),
    ]))
}

/// A Sourcegraph release baked into the local base image (`cloud::local::bake`).
fn local_bake(
    base_dir: &std::path::Path,
    base: &image::ImageManifest,
    out: Option<PathBuf>,
    version: &str,
    registry: (Option<String>, Option<String>),
    timeout: std::time::Duration,
) -> Result<()> {
    let settings = image_settings("local", Some(version.to_string()), None, registry)?;
    let spec = ImageSpec::of(&ImageRequest {
        settings: &settings,
        region: "local".into(),
        copy_to: vec![],
        public: false,
        encrypted: false,
        now: std::time::SystemTime::now(),
    })?;
    let out = out.unwrap_or_else(|| cloud::local::bake::out_dir(base_dir, &spec));
    let boot = image::open(base_dir)?;
    let cache = cache_root()?;
    let (accel, why) = cloud::local::qemu::choose_accel(crate::settings::Accel::Auto, &boot, &cache)
        .map_err(|m| UserError::field("accel", m).hint("the bake runs under TCG when KVM cannot"))?;
    if let Some(w) = why {
        output::note(w);
    }
    let p = Phase::start(format!("local image with Sourcegraph {} baked in", spec.release));
    let (m, cached) = match cloud::local::bake::bake(&boot, base, &out, &spec, accel, timeout, &|m| output::note(format!("  {m}"))) {
        Ok(r) => r,
        Err(e) => {
            p.fail();
            return Err(e);
        }
    };
    p.done_with(if cached { "already baked (same recipe)" } else { "baked" });
    if output::json() {
        return output::result_json(json!({
            "cloud": "local",
            "dir": out,
            "cached": cached,
            "image": m,
            "release": spec.release,
            "recipe": spec.recipe,
            "digests": spec.references(),
        }));
    }
    println!("Local image with Sourcegraph {}: {}", spec.release, out.display());
    println!("  baked {} in {:.0} s{}", m.built_at, m.build_seconds, if cached { " (reused)" } else { "" });
    println!("Use it: sgbox up --cloud local --version {} --base-image {}   (pulls nothing for the release)", spec.release, out.display());
    Ok(())
}

fn aws(
    version: Option<String>,
    region: Option<String>,
    copy_to: Vec<String>,
    (public, unencrypted): (bool, bool),
    dry_run: bool,
    timeout: std::time::Duration,
    registry: (Option<String>, Option<String>),
) -> Result<()> {
    let settings = image_settings("aws", version, region, registry)?;
    let mut copies: Vec<String> = Vec::new();
    for r in copy_to.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
        image_settings("aws", None, Some(r.to_string()), (None, None)).map_err(|e| UserError { field: Some("--copy-to".into()), ..e })?;
        if !copies.iter().any(|c| c == r) {
            copies.push(r.to_string());
        }
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let mut loader = crate::cloud::aws::Aws::loader();
        if let Some(r) = &settings.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        let conf = loader.load().await;
        let region = match settings.region.clone().or_else(|| conf.region().map(|r| r.to_string())) {
            Some(r) => r,
            None => {
                return Err(UserError::field("--region", "no region was given, and AWS_REGION and the profile name none")
                    .hint("pass --region, e.g. --region us-east-1 (Marketplace wants the source image there)")
                    .into())
            }
        };
        copies.retain(|c| *c != region);
        let spec = ImageSpec::of(&ImageRequest {
            settings: &settings,
            region,
            copy_to: copies,
            public,
            encrypted: !(public || unencrypted),
            now: std::time::SystemTime::now(),
        })?;
        let journal = cache_root()?.join("image-builds");
        let builder = AwsImages::new(conf, journal, &spec);
        let p = Phase::start("checking regions and permissions");
        if let Err(e) = builder.preflight(&spec).await {
            p.fail();
            return Err(anyhow::Error::from(e));
        }
        p.done();
        if dry_run {
            if output::json() {
                return output::result_json(json!({ "dry_run": true, "cloud": "aws", "spec": spec }));
            }
            for l in spec.plan_lines() {
                println!("{l}");
            }
            return Ok(());
        }
        let started = std::time::Instant::now();
        let p = Phase::start(format!("image {} (Sourcegraph {})", spec.name, spec.release));
        let images = match builder.build(&spec, timeout, &|m: &str| output::note(format!("  {m}"))).await {
            Ok(i) => {
                p.done();
                i
            }
            Err(e) => {
                p.fail();
                return Err(anyhow::Error::from(e)).context("building the image (temporary resources were removed)");
            }
        };
        let manifest = json!({
            "cloud": "aws",
            "name": spec.name,
            "release": spec.release,
            "recipe": spec.recipe,
            "sgbox_version": spec.sgbox_version,
            "images": images,
            "digests": spec.references(),
            "deprecate_at": spec.deprecate_at,
            "public": spec.public,
            "build_seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "built_at": crate::state::now_rfc3339(),
        });
        if output::json() {
            return output::result_json(manifest);
        }
        println!("Image {} (Sourcegraph {}):", spec.name, spec.release);
        for i in &images {
            println!(
                "  {:<16} {}{}{}",
                i.region,
                i.image_id,
                if i.public { "  public" } else { "" },
                if i.reused { "  (already built)" } else { "" }
            );
        }
        println!("Launch it: sgbox up --cloud aws --version {}   (finds it by its tags; or --image-id)", spec.release);
        Ok(())
    })
}
