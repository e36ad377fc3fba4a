//! `sgbox ssh [-- CMD]`: a command runs over libssh2 with the pinned host key and its exit status
//! becomes ours; without one, OpenSSH opens an interactive shell with the pinned key as its only
//! known host.

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::boxctl;
use super::Context;
use crate::cli::SshArgs;

pub fn run(ctx: &Context, args: SshArgs) -> Result<()> {
    let rt = boxctl::runtime()?;
    let code = rt.block_on(async {
        let mut d = boxctl::open(ctx, &args.target).await?;
        let insecure = args.target.reach.insecure_accept_host_key;
        if args.command.is_empty() {
            // Check (and pin) the host key ourselves first; OpenSSH then trusts only that key.
            let ep = boxctl::running_endpoint(&d).await?;
            boxctl::connect(ctx, &mut d, &ep, insecure, Instant::now() + Duration::from_secs(30)).await?;
            let key = d.dir.ssh_private_key_path();
            let err = std::process::Command::new("ssh")
                .arg("-i")
                .arg(&key)
                .args(["-p", &ep.ssh_port.to_string(), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes"])
                .arg("-o")
                .arg(format!("UserKnownHostsFile={}", d.dir.known_hosts_path().display()))
                .arg(format!("{}@{}", crate::ssh::USER, ep.host))
                .exec();
            return Err(anyhow::Error::new(err).context("running ssh (install openssh-client, or pass a command after --)"));
        }
        boxctl::stream(ctx, &mut d, insecure, shell_join(&args.command)).await
    })?;
    drop(rt);
    std::process::exit(code.clamp(0, 255));
}

/// Quote words for the remote shell, so `sgbox ssh -- echo "a b"` prints `a b`.
fn shell_join(words: &[String]) -> String {
    if words.len() == 1 {
        // One word is a whole command line, as with OpenSSH.
        return words[0].clone();
    }
    words
        .iter()
        .map(|w| {
            if !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b)) {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn words_are_quoted_for_the_remote_shell() {
        let w = |xs: &[&str]| super::shell_join(&xs.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(w(&["docker ps -a"]), "docker ps -a");
        assert_eq!(w(&["echo", "a b", "it's"]), "echo 'a b' 'it'\\''s'");
    }
}
