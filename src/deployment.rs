//! A deployment that exists: its recorded settings, state folder, record and cloud machine, and
//! how its box is reached (SSH with the host key pinned on first contact from the console, then
//! from the record).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::cloud::{Endpoint, Machine};
use crate::onbox::hostkeys;
use crate::onbox::ssh::{self, Target};
use crate::onbox::Session;
use crate::output;
use crate::render::{self, Bundle, Inputs};
use crate::settings::{Settings, Tls};
use crate::state::{write_atomic, DeploymentDir, Record};

pub struct Deployment {
    pub settings: Settings,
    pub dir: DeploymentDir,
    pub record: Option<Record>,
    pub machine: Box<dyn Machine>,
}

/// Connect over SSH, pinning the host key on first contact from the console's fingerprints.
/// Keeps trying while the box is still booting, until `deadline`.
pub async fn connect(d: &mut Deployment, ep: &Endpoint, insecure: bool, deadline: Instant) -> Result<Session> {
    let target = Target { host: ep.host.clone(), port: ep.ssh_port, key: d.dir.ssh_private_key_path() };
    let pinned = d.record.as_ref().and_then(|r| r.host_key.clone());
    if insecure {
        output::warn("--insecure-accept-host-key: trusting whatever host key the box offers, without checking it");
    }
    let machine = &d.machine;
    // Per instance: a new instance (an `up` after `down`) has new host keys.
    let saved = d.dir.path.join(format!("console-hostkeys-{}.txt", d.record.as_ref().and_then(|r| r.instance_id.as_deref()).unwrap_or("unknown")));
    output::detail(format!(
        "ssh {}@{}:{} with {}; host key {}",
        ssh::USER,
        target.host,
        target.port,
        target.key.display(),
        match (&pinned, insecure) {
            (_, true) => "not checked (--insecure-accept-host-key)",
            (Some(_), false) => "pinned in the deployment's record",
            (None, false) => "checked against the console's fingerprints",
        }
    ));
    // The console as read now, and the fingerprint block the first complete read found, kept in
    // the state folder: an AWS console keeps only its last 64 KiB, so later kernel and Docker
    // messages can push the block out before sgbox connects.
    let console = || async {
        let text = machine.console_output().await?;
        let found = hostkeys::parse_console(&text);
        if !found.fingerprints.is_empty() {
            if let Some(block) = hostkeys::fingerprint_block(&found) {
                write_atomic(&saved, block.as_bytes(), 0o600)?;
            }
            return Ok(text);
        }
        Ok(std::fs::read_to_string(&saved).unwrap_or_default() + &text)
    };
    let s = Session::connect(target.clone(), pinned.as_deref(), insecure, console, deadline).await?;
    if let Some(old) = pinned.as_deref().filter(|p| p.split_whitespace().take(2).ne(s.host_key().split_whitespace().take(2))) {
        // Only with --insecure-accept-host-key: said loudly, both fingerprints named.
        output::warn(format!(
            "--insecure-accept-host-key: the box's host key changed from {} to {}; the new one is pinned now",
            hostkeys::fingerprint(old).unwrap_or_else(|_| old.to_string()),
            hostkeys::fingerprint(s.host_key()).unwrap_or_else(|_| s.host_key().to_string())
        ));
    }
    if pinned.as_deref() != Some(s.host_key()) {
        if let Some(r) = d.record.as_mut() {
            r.host_key = Some(s.host_key().to_string());
            d.dir.save_record(r)?;
        }
    }
    ssh::ensure_known_hosts(&d.dir.known_hosts_path(), &target, s.host_key())?;
    Ok(s)
}

/// The running box's endpoint, or a clear error if it is not running.
pub async fn running_endpoint(d: &Deployment) -> Result<Endpoint> {
    match d.machine.endpoint().await? {
        Some(ep) => Ok(ep),
        None => bail!("the box \"{}\" is not running; start it with `sgbox up --name {}`", d.settings.name, d.settings.name),
    }
}

/// Run `cmd` on the running box (with `input` on its stdin, then EOF), its output streamed to
/// ours; returns its exit status.
pub async fn stream(d: &mut Deployment, insecure: bool, cmd: String, input: Option<Vec<u8>>) -> Result<i32> {
    let ep = running_endpoint(d).await?;
    let s = connect(d, &ep, insecure, Instant::now() + Duration::from_secs(90)).await?;
    s.stream(cmd, input).await
}

/// Render a deployment's files with its SSH key (generated on first use): the I/O around the
/// pure [`crate::render::render`]. Nothing is read from the user's files, so an upgrade or
/// rollback never depends on paths that may have moved since `up`.
pub fn bundle(dir: &DeploymentDir, s: &Settings) -> Result<Bundle> {
    let ssh_public_key = dir.ssh_public_key()?;
    render::render(&Inputs { settings: s, release: s.release(), login: render::Login::Sgbox(&ssh_public_key) })
}

/// For `tls = custom`: send the user's certificate chain and key to the box over SSH (the key
/// through stdin, 0600), where the stack waits for them. Only `up` reads the user's files.
pub async fn send_tls(on: &Session, s: &Settings) -> Result<()> {
    let Tls::Custom { cert, key } = &s.tls else { return Ok(()) };
    let cert_pem = std::fs::read_to_string(cert).with_context(|| format!("reading {}", cert.display()))?;
    let key_pem = std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    on.put(render::TLS_CERT, &cert_pem, 0o644).await?;
    on.put_private(render::TLS_KEY, &key_pem, 0o600).await
}
