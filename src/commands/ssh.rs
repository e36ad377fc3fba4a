//! `sgbox ssh [-- CMD]`: a command runs over libssh2 with the pinned host key and its exit status
//! becomes ours; without one, OpenSSH opens an interactive shell with the pinned key as its only
//! known host.

use std::io::{IsTerminal, Read};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::boxctl;
use super::Context;
use crate::cli::SshArgs;
use crate::onbox;

pub fn run(ctx: &Context, args: SshArgs) -> Result<u8> {
    let rt = boxctl::runtime()?;
    let code = rt.block_on(async {
        let mut d = boxctl::open(ctx, &args.target).await?;
        let insecure = args.target.reach.insecure_accept_host_key;
        if args.command.is_empty() {
            // Check (and pin) the host key ourselves first; OpenSSH then trusts only that key.
            let ep = boxctl::running_endpoint(&d).await?;
            boxctl::connect(&mut d, &ep, insecure, Instant::now() + Duration::from_secs(30)).await?;
            let key = d.dir.ssh_private_key_path();
            let err = std::process::Command::new("ssh")
                .arg("-i")
                .arg(&key)
                .args(["-p", &ep.ssh_port.to_string(), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes"])
                .arg("-o")
                .arg(format!("UserKnownHostsFile={}", d.dir.known_hosts_path().display()))
                .arg(format!("{}@{}", crate::onbox::ssh::USER, ep.host))
                .exec();
            return Err(anyhow::Error::new(err).context("running ssh (install openssh-client, or pass a command after --)"));
        }
        // What is piped in goes to the command, then end of file (`sgbox ssh -- sudo tee F < F`);
        // from a terminal nothing is forwarded, and the command sees end of file at once rather
        // than waiting for input that never comes.
        let stdin = std::io::stdin();
        let mut input = Vec::new();
        if !stdin.is_terminal() {
            stdin.lock().read_to_end(&mut input).context("reading standard input for the command")?;
        }
        boxctl::stream(&mut d, insecure, onbox::join(&args.command), Some(input)).await
    })?;
    Ok(code.clamp(0, 255) as u8)
}
