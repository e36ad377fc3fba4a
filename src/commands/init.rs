//! The interactive provisioner's command side: `sgbox init`, and what `sgbox up` does on a
//! terminal before it creates anything. The questions are `settings::wizard`'s; here they meet
//! the world (AWS's configured region, its zones and account, the caller's public address, the
//! state folder), the plan is shown, and the answers are written as a sgbox.toml that `-f` reads
//! back unchanged, with the one-line command that makes the same box without questions.
//!
//! Nothing is written before the last answer: Ctrl-C (or Esc) at any question leaves no file
//! and no state folder behind.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::json;

use super::{boxctl, plan, Context};
use crate::cli::{DeploymentArgs, InitArgs};
use crate::cloud;
use crate::output;
use crate::prompt::Terminal;
use crate::settings::wizard::{self, Ask, Lookups, Outcome};
use crate::settings::{Cloud, Settings};
use crate::state::write_atomic;

/// Where the caller's public address is asked, unless SGBOX_CHECKIP_URL names another service
/// (or is empty: then it is not asked). AWS's own: it answers with the address and nothing else.
const CHECKIP: &str = "https://checkip.amazonaws.com";

/// Why the questions are asked: `up` confirms and goes on to create the box; `init` only writes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Up,
    Init,
}

struct World<'a> {
    ctx: &'a Context,
    rt: tokio::runtime::Runtime,
}

impl Lookups for World<'_> {
    fn default_region(&self, cloud: Cloud) -> Option<(String, String)> {
        match cloud {
            Cloud::Aws => self.rt.block_on(cloud::aws::lookup::configured_region()),
            _ => None,
        }
    }

    fn zones(&self, cloud: Cloud, region: &str, machine: &str) -> Result<Vec<String>, String> {
        match cloud {
            Cloud::Aws => self.rt.block_on(cloud::aws::lookup::zones_offering(region, machine)).map_err(|e| e.to_string()),
            _ => Err(format!("sgbox cannot list the zones of {cloud}")),
        }
    }

    fn public_address(&self) -> Result<(IpAddr, String), String> {
        let url = std::env::var("SGBOX_CHECKIP_URL").unwrap_or_else(|_| CHECKIP.to_string());
        if url.trim().is_empty() {
            return Err("SGBOX_CHECKIP_URL is empty, so it was not looked up".into());
        }
        let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
        let body = agent
            .get(url.trim())
            .call()
            .and_then(|mut r| r.body_mut().with_config().limit(1024).read_to_string())
            .map_err(|e| format!("asking {url}: {e}"))?;
        let ip: IpAddr = body.trim().parse().map_err(|_| format!("{url} answered {:?}, not an address", body.trim()))?;
        Ok((ip, format!("as {url} sees it")))
    }

    fn existing(&self, name: &str) -> Option<(PathBuf, String)> {
        let dir = self.ctx.deployment_dir(name).ok()?;
        let record = dir.record().ok()??;
        Some((dir.record_path(), record.settings))
    }
}

/// Ask for what `args` (with SGBOX_* and `-f`) leave open. `Some(settings)` when `up` should go
/// on; `None` when the user declined the plan (the answers are saved all the same).
pub fn interview(ctx: &Context, args: &DeploymentArgs, purpose: Purpose, out: Option<&Path>) -> Result<Option<(Settings, PathBuf)>> {
    let given = ctx.given(args.pairs())?;
    let world = World { ctx, rt: boxctl::runtime()? };
    let mut term = Terminal::new();
    let layer = match wizard::walk(&given, cloud::AVAILABLE, &mut term, &world)? {
        Outcome::Resume { name, record } => {
            let rec = ctx.deployment_dir(&name)?.record()?.with_context(|| format!("{} is gone", record.display()))?;
            let (s, warnings) = Settings::recorded(&rec.settings, &record, &given)?;
            for w in warnings {
                output::warn(w);
            }
            let path = config_path(ctx, out, &name)?;
            if purpose == Purpose::Init {
                save(&path, &s)?;
                repeat(ctx, &path, &name);
            }
            return Ok(Some((s, path)));
        }
        Outcome::New(layer) => layer,
    };
    let s = Settings::resolve(&layer)?;
    for w in s.warnings() {
        output::warn(w);
    }

    eprintln!();
    for line in plan::summary(&s) {
        eprintln!("{line}");
    }
    if s.cloud == Cloud::Aws {
        let region = s.region.clone().unwrap_or_default();
        match world.rt.block_on(cloud::aws::lookup::caller(&region)) {
            Ok((account, arn)) => eprintln!("Account      AWS account {account} ({arn}), region {region}"),
            Err(e) => output::warn(format!("the AWS credentials could not be checked ({e}); `up` needs them")),
        }
    }
    eprintln!("Would create:");
    for line in plan::resource_lines(&s) {
        eprintln!("{line}");
    }
    eprintln!();

    let go = match purpose {
        Purpose::Up => term.confirm("Create it?", "no: nothing is created; the answers are saved for later", true)?,
        Purpose::Init => false,
    };
    let path = config_path(ctx, out, &s.name)?;
    save(&path, &s)?;
    repeat(ctx, &path, &s.name);
    if purpose == Purpose::Up && !go {
        output::note("Nothing was created.");
        return Ok(None);
    }
    Ok(Some((s, path)))
}

/// Where the answers go: `out`, else sgbox.toml in the deployment's state folder.
fn config_path(ctx: &Context, out: Option<&Path>, name: &str) -> Result<PathBuf> {
    Ok(match out {
        Some(p) => p.to_path_buf(),
        None => ctx.deployment_dir(name)?.path.join("sgbox.toml"),
    })
}

fn save(path: &Path, s: &Settings) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    write_atomic(path, s.to_toml().as_bytes(), 0o644)
}

/// The one line that makes the same box without questions.
fn command_line(ctx: &Context, path: &Path) -> String {
    let q = |p: &Path| shlex::try_quote(&p.display().to_string()).map(|c| c.into_owned()).unwrap_or_else(|_| p.display().to_string());
    let state = ctx.state_dir.as_deref().map(|d| format!(" --state-dir {}", q(d))).unwrap_or_default();
    format!("sgbox -f {}{state} up --yes", q(path))
}

fn repeat(ctx: &Context, path: &Path, name: &str) {
    output::note(format!("Saved the settings of \"{name}\" to {}", path.display()));
    output::note(format!("The same box, without questions:\n  {}", command_line(ctx, path)));
}

/// `sgbox init`: the questions (on a terminal), then the file. Without a terminal, or with
/// --yes or --output json, nothing is asked: the given values are resolved as `plan` does.
pub fn run(ctx: &Context, args: InitArgs) -> Result<()> {
    let (s, path) = if ctx.interactive() {
        interview(ctx, &args.deployment, Purpose::Init, args.out.as_deref())?.expect("init always returns its settings")
    } else {
        let s = ctx.settings(&args.deployment)?;
        let path = config_path(ctx, args.out.as_deref(), &s.name)?;
        save(&path, &s)?;
        if !output::json() {
            repeat(ctx, &path, &s.name);
        }
        (s, path)
    };
    if output::json() {
        return output::result_json(json!({ "path": path, "command": command_line(ctx, &path), "settings": s }));
    }
    Ok(())
}
