//! A running box, reached over SSH: the client (`ssh`), host-key pinning from the console
//! (`hostkeys`), and one [`Session`] through which everything that runs on the box goes: `run` a
//! command, `put` a file, run a long `step` that survives a dropped connection, `stream` output
//! to the terminal. One quoting helper ([`quote`], [`join`]) for every word put in a command.

pub mod hostkeys;
pub mod ssh;

use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use base64::Engine;

use self::ssh::{HostKeyPolicy, Output, Ssh, SshError, Target};
use crate::output;

/// The step runner (`templates/upgrade/run-step.sh`) and where it and the steps live on the box.
const RUN_STEP: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/upgrade/run-step.sh"));
pub const HELPERS: &str = "/usr/local/lib/sgbox";
pub const STEPS: &str = "/var/lib/sgbox/steps";

/// Quote one word for the box's shell (POSIX sh).
pub fn quote(word: &str) -> String {
    shlex::try_quote(word).map(|c| c.into_owned()).unwrap_or_else(|_| format!("'{}'", word.replace('\0', "")))
}

/// Words as one command line for the box's shell; one word is taken as a whole command line, as
/// OpenSSH does (`sgbox ssh -- 'docker ps -a'`).
pub fn join(words: &[String]) -> String {
    if words.len() == 1 {
        return words[0].clone();
    }
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

/// Shell that writes `content` to `path` atomically as root (its folder must exist). The content
/// travels base64-encoded, so nothing in it is ever interpreted by a shell.
pub fn put_cmd(path: &str, content: &str, mode: u32) -> String {
    let (p, tmp) = (quote(path), quote(&format!("{path}.sgbox-tmp")));
    format!("echo {} | base64 -d | sudo tee {tmp} >/dev/null && sudo chmod {mode:o} {tmp} && sudo mv {tmp} {p}", b64(content))
}

/// Shell that appends `line` to `path` as root.
pub fn append_cmd(path: &str, line: &str) -> String {
    format!("echo {} | base64 -d | sudo tee -a {} >/dev/null", b64(line), quote(path))
}

/// A command as errors and `-vv` show it: its first line, at most 80 characters, with the
/// base64 payloads of [`put_cmd`] and [`append_cmd`] elided (they carry file contents).
fn shown(cmd: &str) -> String {
    let l = cmd.lines().next().unwrap_or("");
    let payload = |w: &str| w.len() > 24 && w.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    let l = l.split(' ').map(|w| if payload(w) { format!("<{} base64 chars>", w.len()) } else { w.to_string() }).collect::<Vec<_>>().join(" ");
    match l.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &l[..i]),
        None => l,
    }
}

/// An SSH session to the box, the host key checked.
#[derive(Clone)]
pub struct Session {
    /// Replaced by [`Session::reconnect`] when the connection dies.
    ssh: std::sync::Arc<std::sync::RwLock<Ssh>>,
    /// The host key the box presented; reconnects pin it.
    host_key: String,
}

/// One connection attempt (TCP, key exchange, authentication): a box busy migrating (or an
/// emulated one) can take many seconds to answer a key exchange.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one poll of a running step may take before the connection counts as stalled.
const STEP_POLL: u64 = 60;
const STEP_POLL_STALL: Duration = Duration::from_secs(STEP_POLL + 90);
/// Reconnects one step may need before sgbox gives up (the step keeps running on the box).
const MAX_RECONNECTS: u32 = 30;

impl Session {
    /// Connect, pinning the host key: `pinned` when the deployment has one; else one of the
    /// fingerprints the console printed (`console` is asked again on each try, as the box may
    /// still be booting); anything only when `insecure`. Keeps trying until `deadline`; a changed
    /// or mismatching host key fails at once.
    pub async fn connect<F, Fut>(target: Target, pinned: Option<&str>, insecure: bool, console: F, deadline: Instant) -> Result<Session>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<String>>,
    {
        let mut last;
        loop {
            let policy = match (pinned, insecure) {
                (Some(k), false) => HostKeyPolicy::Pinned(k.to_string()),
                (_, true) => HostKeyPolicy::AcceptAny,
                (None, false) => HostKeyPolicy::Console(hostkeys::parse_console(&console().await?)),
            };
            // No fingerprints on the console yet: do not knock. Every connection dropped before
            // authentication counts against this address in OpenSSH's PerSourcePenalties, and
            // enough of them get it refused for minutes.
            let unprinted = matches!(&policy, HostKeyPolicy::Console(c) if c.fingerprints.is_empty());
            let attempt = if unprinted {
                Err(SshError::HostKey(hostkeys::HostKeyError::NotPrinted))
            } else {
                ssh::connect(target.clone(), policy, CONNECT_TIMEOUT).await
            };
            match attempt {
                Ok(s) => return Ok(Session { host_key: s.host_key.clone(), ssh: std::sync::Arc::new(std::sync::RwLock::new(s)) }),
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

    /// The host key the box presented (OpenSSH `type base64`).
    pub fn host_key(&self) -> &str {
        &self.host_key
    }

    fn ssh(&self) -> Ssh {
        self.ssh.read().expect("ssh lock").clone()
    }

    /// Open a new connection to the same box (its host key pinned), retrying for two minutes,
    /// and use it from now on.
    pub async fn reconnect(&self) -> Result<()> {
        let target = self.ssh().target.clone();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = String::new();
        while Instant::now() < deadline {
            match ssh::connect(target.clone(), HostKeyPolicy::Pinned(self.host_key.clone()), CONNECT_TIMEOUT).await {
                Ok(s) => {
                    *self.ssh.write().expect("ssh lock") = s;
                    return Ok(());
                }
                Err(e @ SshError::ChangedHostKey { .. }) => return Err(anyhow::Error::new(e).context("reconnecting to the box")),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        bail!("could not reconnect to {}:{} within 2 minutes (last: {last})", target.host, target.port)
    }

    /// Run a read-only command; its exit status and output, whatever the status. A connection
    /// that died is reopened once and the command asked again (it only reads).
    pub async fn exec(&self, cmd: &str) -> Result<Output, SshError> {
        match self.ssh().exec_within(cmd, None, Some(STEP_POLL_STALL)).await {
            Err(e) if e.is_connection() => {
                output::warn(format!("the SSH connection failed ({e}); reconnecting"));
                if self.reconnect().await.is_err() {
                    return Err(e);
                }
                self.ssh().exec_within(cmd, None, Some(STEP_POLL_STALL)).await
            }
            other => other,
        }
    }

    /// Run a command; its stdout, or an error with its stderr.
    pub async fn run(&self, cmd: &str) -> Result<String> {
        output::trace(format!("  on the box: {}", shown(cmd)));
        let out = self.ssh().exec(cmd).await.with_context(|| format!("running `{}` on the box", shown(cmd)))?;
        if out.status != 0 {
            bail!("`{}` on the box exited {}: {}", shown(cmd), out.status, out.stderr.trim());
        }
        Ok(out.stdout)
    }

    /// Run a command with `input` on its stdin; its stdout, or an error with its stderr. What
    /// goes in (a secret) is never part of a command line.
    pub async fn run_input(&self, cmd: &str, input: &[u8]) -> Result<String> {
        output::trace(format!("  on the box (with input): {}", shown(cmd)));
        let out = self.ssh().exec_input(cmd, Some(input.to_vec())).await.with_context(|| format!("running `{}` on the box", shown(cmd)))?;
        if out.status != 0 {
            bail!("`{}` on the box exited {}: {}", shown(cmd), out.status, out.stderr.trim());
        }
        Ok(out.stdout)
    }

    /// Write a private file (a key) on the box atomically as root, through stdin: created with
    /// its mode (never briefly readable), its content in no command line.
    pub async fn put_private(&self, path: &str, content: &str, mode: u32) -> Result<()> {
        let dir = path.rsplit_once('/').map_or("/", |(d, _)| if d.is_empty() { "/" } else { d });
        let (p, tmp) = (quote(path), quote(&format!("{path}.sgbox-tmp")));
        let cmd = format!(
            "sudo install -d -m 0755 {} && sudo sh -c 'umask 077 && cat > \"$1\" && chmod {mode:o} \"$1\" && mv \"$1\" \"$2\"' sh {tmp} {p}",
            quote(dir)
        );
        self.run_input(&cmd, content.as_bytes()).await.map(|_| ())
    }

    /// Write a file on the box atomically (as root), creating its folder.
    pub async fn put(&self, path: &str, content: &str, mode: u32) -> Result<()> {
        let dir = path.rsplit_once('/').map_or("/", |(d, _)| if d.is_empty() { "/" } else { d });
        self.run(&format!("sudo install -d -m 0755 {} && {}", quote(dir), put_cmd(path, content, mode))).await.map(|_| ())
    }

    /// Install (again) the step runner, so that it matches this sgbox.
    pub async fn install_runner(&self) -> Result<()> {
        self.put(&format!("{HELPERS}/run-step"), RUN_STEP, 0o755).await
    }

    /// Run `script` as the step `name`: a transient systemd unit that keeps going if this
    /// connection drops, and that a re-run waits for instead of starting twice. sgbox polls it a
    /// minute at a time (so a silent connection is noticed), and when the connection dies it
    /// reconnects and re-attaches to the same run (a token tells it from a new one). Ok(()) or
    /// the end of its log. Needs [`Session::install_runner`] first.
    pub async fn step(&self, name: &str, script: &str, max: Duration) -> Result<()> {
        self.put(&format!("{STEPS}/{name}.sh"), &format!("set -eu\n{script}\n"), 0o700).await?;
        let max = max.as_secs().max(60);
        let token = crate::state::random_token(16);
        let cmd = format!("sudo sh {HELPERS}/run-step {} {max} {STEP_POLL} {token}", quote(name));
        let mut reconnects = 0;
        let out = loop {
            match self.ssh().exec_within(&cmd, None, Some(STEP_POLL_STALL)).await {
                // Still running after a poll: attach again.
                Ok(out) if out.status == 125 => continue,
                Ok(out) => break out,
                Err(e) if e.is_connection() && reconnects < MAX_RECONNECTS => {
                    reconnects += 1;
                    output::warn(format!("lost the connection during step `{name}` ({e}); it goes on on the box; reconnecting to re-attach"));
                    self.reconnect().await.with_context(|| format!("re-attaching to step {name}"))?;
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("running step {name} on the box"))),
            }
        };
        if out.status == 0 {
            return Ok(());
        }
        let log = self.run(&format!("sudo tail -n 25 {}", quote(&format!("{STEPS}/{name}.log")))).await.unwrap_or_default();
        Err(anyhow!("step `{name}` exited {} on the box; the end of {STEPS}/{name}.log:\n{}", out.status, log.trim_end()))
    }

    /// Run `cmd`, handing each line of its stdout to `on_line` as it arrives, until it ends (its
    /// exit status) or `on_line` returns true (`Ok(None)`: the reader had seen enough). `within`
    /// bounds it. `on_line` comes back with whatever it learned.
    pub async fn watch<F>(&self, cmd: &str, within: Duration, mut on_line: F) -> Result<(Option<i32>, F), SshError>
    where
        F: FnMut(&str) -> bool + Send + 'static,
    {
        output::trace(format!("  on the box (watched): {}", shown(cmd)));
        let (s, cmd) = (self.ssh(), cmd.to_string());
        tokio::task::spawn_blocking(move || {
            let status = s.watch_blocking(&cmd, within, &mut on_line)?;
            Ok(((status != ssh::STOPPED_STATUS).then_some(status), on_line))
        })
        .await
        .expect("ssh task")
    }

    /// Run `cmd` (with `input` on its stdin, then EOF) with its output copied to ours as it
    /// arrives; its exit status.
    pub async fn stream(&self, cmd: String, input: Option<Vec<u8>>) -> Result<i32> {
        let s = self.ssh();
        tokio::task::spawn_blocking(move || {
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            let status = s.stream_blocking(&cmd, input.as_deref(), &mut out, &mut err);
            let _ = out.flush();
            status
        })
        .await
        .expect("ssh task")
        .context("running the command on the box")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_the_remote_shell() {
        let w = |xs: &[&str]| join(&xs.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(w(&["docker ps -a"]), "docker ps -a");
        let line = w(&["echo", "a b", "it's", "$HOME"]);
        assert_eq!(shlex::split(&line).unwrap(), vec!["echo", "a b", "it's", "$HOME"], "{line}");
        assert_eq!(quote("plain-word_1.2"), "plain-word_1.2");
    }

    #[test]
    fn shown_commands_never_carry_file_contents() {
        let secret = "PGSQL_PASSWORD=Pw1aaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n";
        let cmd = format!("sudo install -d -m 0755 /opt/sgbox && {}", put_cmd("/opt/sgbox/.env", secret, 0o600));
        let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
        let s = shown(&cmd);
        assert!(!s.contains(&b64[..8]), "{s}");
        assert!(s.starts_with("sudo install -d -m 0755 /opt/sgbox && echo <"), "{s}");
        assert_eq!(shown("docker ps -a\nsecond line"), "docker ps -a");
    }

    #[test]
    fn put_cmd_writes_the_file_atomically_with_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // The box runs it through sudo; here a shim that just runs the command.
        crate::testkit::fake_tool(dir.path(), "sudo", "exec \"$@\"");
        let target = dir.path().join("a b.env").display().to_string();
        let content = "PGSQL_PASSWORD='x y'\n$HOME `id`\n";
        let out = crate::testkit::sh_on_path(dir.path(), &put_cmd(&target, content, 0o600));
        assert!(out.status.success());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), content, "bytes arrive unchanged, nothing expanded");
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!std::path::Path::new(&format!("{target}.sgbox-tmp")).exists(), "no temporary file left");
    }
}
