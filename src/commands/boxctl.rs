//! What the commands that reach an existing box share: finding the deployment (its record, or
//! flags when the record is lost), its provider, and an SSH session with the host key pinned.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::Context;
use crate::cli::TargetArgs;
use crate::error::UserError;
use crate::hostkeys;
use crate::provider::{self, Endpoint, Provider};
use crate::settings::{Layer, Prompter, Settings, DEFAULT_NAME};
use crate::ssh::{self, HostKeyPolicy, Ssh, SshError, Target};
use crate::state::{cache_root, write_atomic, DeploymentDir, Record};

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")
}

pub fn parse_duration(flag: &str, text: &str) -> Result<Duration, UserError> {
    humantime::parse_duration(text.trim())
        .map_err(|e| UserError::field(flag, format!("'{text}' is not a duration: {e}")).hint("write it like 90s, 20m or 1h"))
}

pub struct Deployment {
    pub settings: Settings,
    pub dir: DeploymentDir,
    pub record: Option<Record>,
    pub provider: Box<dyn Provider>,
}

/// What the user gave for `target` (flags > SGBOX_* > -f file), the deployment name it comes to,
/// and that deployment's state folder.
pub fn locate(ctx: &Context, target: &TargetArgs) -> Result<(Layer, String, DeploymentDir)> {
    let flags = Layer::from_flags(target.pairs());
    let env = Layer::from_env(|k| std::env::var(k).ok());
    let file = match &ctx.config {
        Some(p) => Layer::from_file(p)?,
        None => Layer::default(),
    };
    let given = flags.over(env).over(file);
    let name = given.text("name").unwrap_or(DEFAULT_NAME).trim().to_string();
    let dir = ctx.deployment_dir(&name)?;
    Ok((given, name, dir))
}

/// The deployment `target` names. Its record's settings apply; flags fill in when it is lost.
pub async fn open(ctx: &Context, target: &TargetArgs) -> Result<Deployment> {
    let (given, name, dir) = locate(ctx, target)?;
    let record = dir.record()?;
    let layer = match &record {
        Some(r) => given.over(Layer::parse_toml(&r.settings, &dir.path.join("deployment.json"))?),
        None => given,
    };
    let settings = Settings::resolve(&layer, &Prompter { interactive: false }).map_err(|e| {
        if record.is_none() && e.field.as_deref() == Some("cloud") {
            UserError::field("name", format!("no deployment named \"{name}\" in {}", dir.path.parent().unwrap_or(Path::new(".")).display()))
                .hint("check --name and --state-dir; to clean up a box whose state was lost, also pass --cloud (and --region)")
        } else {
            e
        }
    })?;
    let provider = provider::for_deployment(&settings, &dir, cache_root()?).await?;
    Ok(Deployment { settings, dir, record, provider })
}

/// Connect over SSH, pinning the host key on first contact from the console's fingerprints.
/// Keeps trying while the box is still booting, until `deadline`.
pub async fn connect(ctx: &Context, d: &mut Deployment, ep: &Endpoint, insecure: bool, deadline: Instant) -> Result<Ssh> {
    let target = Target { host: ep.host.clone(), port: ep.ssh_port, key: d.dir.ssh_private_key_path() };
    let pinned = d.record.as_ref().and_then(|r| r.host_key.clone());
    if insecure && pinned.is_none() {
        ctx.warn("--insecure-accept-host-key: trusting whatever host key the box offers, without checking its console");
    }
    let mut last;
    loop {
        let policy = match (&pinned, insecure) {
            (Some(k), false) => HostKeyPolicy::Pinned(k.clone()),
            (_, true) => HostKeyPolicy::AcceptAny,
            (None, false) => HostKeyPolicy::Console(hostkeys::parse_console(&d.provider.console_output().await?)),
        };
        match ssh::connect(target.clone(), policy, Duration::from_secs(15)).await {
            Ok(s) => {
                if pinned.as_deref() != Some(s.host_key.as_str()) {
                    pin(d, &target, &s.host_key)?;
                }
                return Ok(s);
            }
            Err(e @ (SshError::ChangedHostKey { .. } | SshError::HostKey(hostkeys::HostKeyError::Mismatch { .. }))) => {
                return Err(anyhow::Error::new(e).context("refusing the box's SSH host key"))
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            bail!("could not open SSH to {}:{} in time (last: {last})", target.host, target.port);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn pin(d: &mut Deployment, target: &Target, key: &str) -> Result<()> {
    write_atomic(&d.dir.known_hosts_path(), ssh::known_hosts_line(target, key).as_bytes(), 0o600)?;
    if let Some(r) = d.record.as_mut() {
        r.host_key = Some(key.to_string());
        d.dir.save_record(r)?;
    }
    Ok(())
}

/// The running box's endpoint, or a clear error if it is not running.
pub async fn running_endpoint(d: &Deployment) -> Result<Endpoint> {
    match d.provider.endpoint().await? {
        Some(ep) => Ok(ep),
        None => bail!("the box \"{}\" is not running; start it with `sgbox up --name {}`", d.settings.name, d.settings.name),
    }
}

/// Run `cmd` on the running box, its output streamed to ours; returns its exit status.
pub async fn stream(ctx: &Context, d: &mut Deployment, insecure: bool, cmd: String) -> Result<i32> {
    let ep = running_endpoint(d).await?;
    let s = connect(ctx, d, &ep, insecure, Instant::now() + Duration::from_secs(30)).await?;
    tokio::task::spawn_blocking(move || s.stream_blocking(&cmd, &mut std::io::stdout(), &mut std::io::stderr()))
        .await
        .expect("ssh task")
        .context("running the command on the box")
}

/// Ask "Proceed? [y/N]" on the terminal after `explain` was printed; without a terminal, refuse
/// with `needs` (exit 2: pass --yes). `cancelled` ends the message when the answer is no.
pub fn confirm(needs: UserError, explain: impl FnOnce(), cancelled: &str) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        return Err(needs.into());
    }
    explain();
    eprint!("Proceed? [y/N] ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).ok();
    if !matches!(line.trim(), "y" | "Y" | "yes") {
        bail!("cancelled; {cancelled}");
    }
    Ok(())
}
