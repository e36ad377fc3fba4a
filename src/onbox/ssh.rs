//! SSH to the box with libssh2 (the ssh2 crate), run on tokio's blocking pool.
//!
//! Host keys are pinned, never trusted blindly: on first contact the key the box offers must be
//! one whose fingerprint cloud-init printed on the serial console ([`crate::onbox::hostkeys`]); after
//! that it must equal the pinned key. `--insecure-accept-host-key` is the loud way out.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::onbox::hostkeys::{self, ConsoleHostKeys, HostKeyError};

pub const USER: &str = "sgbox";

/// The exit status [`Ssh::watch_blocking`] reports when its reader stopped the command.
pub const STOPPED_STATUS: i32 = -2;
const STOPPED: &str = "stopped by its reader";

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot reach {0} yet: {1}")]
    Unreachable(String, String),
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
    #[error("the box at {addr} offered host key {offered}, but {pinned} is pinned for it: refusing to connect (the VM was replaced or someone is in between); if you rebuilt it on purpose, run `sgbox down` and `sgbox up`, or pass --insecure-accept-host-key")]
    ChangedHostKey { addr: String, offered: String, pinned: String },
    #[error("SSH to {addr}: {message}")]
    Protocol { addr: String, message: String },
    #[error("SSH to {addr}: no answer within {}", humantime::format_duration(*.waited))]
    Stalled { addr: String, waited: Duration },
}

impl SshError {
    /// The connection itself failed (worth reconnecting), rather than the box refusing us.
    pub fn is_connection(&self) -> bool {
        matches!(self, SshError::Protocol { .. } | SshError::Stalled { .. } | SshError::Unreachable(..))
    }
}

/// What the client accepts as the box's host key.
#[derive(Clone, Debug)]
pub enum HostKeyPolicy {
    /// Exactly this OpenSSH public key (`type base64`).
    Pinned(String),
    /// One of the keys cloud-init printed on the console.
    Console(ConsoleHostKeys),
    /// Anything: only with --insecure-accept-host-key.
    AcceptAny,
}

#[derive(Clone, Debug)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub key: PathBuf,
}

impl Target {
    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// An authenticated session; clone-able handle usable from async code.
#[derive(Clone)]
pub struct Ssh {
    session: Arc<Mutex<ssh2::Session>>,
    /// The host key the box presented (OpenSSH `type base64`).
    pub host_key: String,
    pub target: Target,
}

const KEEPALIVE_SECS: u32 = 15;

fn proto(addr: &str) -> impl Fn(ssh2::Error) -> SshError + '_ {
    move |e| SshError::Protocol { addr: addr.to_string(), message: e.message().to_string() }
}

/// The OpenSSH form (`type base64`) of the host key the session negotiated.
fn offered_key(sess: &ssh2::Session) -> Option<String> {
    let (blob, _) = sess.host_key()?;
    let key = ssh_key::PublicKey::from_bytes(blob).ok()?;
    let line = key.to_openssh().ok()?;
    let mut parts = line.split_whitespace();
    Some(format!("{} {}", parts.next()?, parts.next()?))
}

/// Connect, check the host key against `policy`, authenticate with the deployment key.
pub fn connect_blocking(target: &Target, policy: &HostKeyPolicy, timeout: Duration) -> Result<Ssh, SshError> {
    let addr = target.addr();
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| SshError::Unreachable(addr.clone(), e.to_string()))?
        .next()
        .ok_or_else(|| SshError::Unreachable(addr.clone(), "no address".into()))?;
    let tcp = TcpStream::connect_timeout(&sock, timeout).map_err(|e| SshError::Unreachable(addr.clone(), e.to_string()))?;
    let mut sess = ssh2::Session::new().map_err(proto(&addr))?;
    sess.set_timeout(timeout.as_millis() as u32);
    sess.set_tcp_stream(tcp);
    // QEMU's forward accepts before the guest's sshd listens; a handshake failure is "not yet".
    sess.handshake().map_err(|e| SshError::Unreachable(addr.clone(), e.message().to_string()))?;
    let offered = offered_key(&sess).ok_or_else(|| HostKeyError::Unreadable("no host key negotiated".into()))?;
    match policy {
        HostKeyPolicy::Pinned(pinned) => {
            if pinned.split_whitespace().take(2).collect::<Vec<_>>() != offered.split_whitespace().collect::<Vec<_>>() {
                return Err(SshError::ChangedHostKey {
                    addr,
                    offered: hostkeys::fingerprint(&offered).unwrap_or(offered.clone()),
                    pinned: hostkeys::fingerprint(pinned).unwrap_or(pinned.clone()),
                });
            }
        }
        HostKeyPolicy::Console(c) => {
            hostkeys::verify(&offered, c)?;
        }
        HostKeyPolicy::AcceptAny => {}
    }
    sess.userauth_pubkey_file(USER, None, &target.key, None).map_err(proto(&addr))?;
    if !sess.authenticated() {
        return Err(SshError::Protocol { addr, message: "the deployment key was not accepted".into() });
    }
    // Keepalives every 15 s (sent from the read loop, where libssh2 needs us to send them): a
    // quiet migration behind a NAT (AWS NAT gateways drop idle flows after 350 s) keeps its flow.
    // Only once the session is up: configured before the handshake, libssh2 breaks the key
    // exchange.
    sess.set_keepalive(true, KEEPALIVE_SECS);
    // Long commands (logs, waits) set their own pace; keep-alives stop NAT and slirp drops.
    sess.set_keepalive(true, 15);
    sess.set_timeout(0);
    Ok(Ssh { session: Arc::new(Mutex::new(sess)), host_key: offered, target: target.clone() })
}

pub async fn connect(target: Target, policy: HostKeyPolicy, timeout: Duration) -> Result<Ssh, SshError> {
    tokio::task::spawn_blocking(move || connect_blocking(&target, &policy, timeout)).await.expect("ssh connect task")
}

impl Ssh {
    fn addr(&self) -> String {
        self.target.addr()
    }

    /// Run a command; collect its output.
    /// Run a command with `input` on its stdin (then EOF); collect its output. Secrets travel
    /// this way: never in a command line, where `ps` on the box would show them.
    pub fn exec_input_blocking(&self, cmd: &str, input: Option<&[u8]>, within: Option<Duration>) -> Result<Output, SshError> {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let status = self.stream_input_blocking(cmd, input, within, &mut out, &mut err)?;
        Ok(Output { status, stdout: String::from_utf8_lossy(&out).into_owned(), stderr: String::from_utf8_lossy(&err).into_owned() })
    }

    /// Run a command (with `input` on its stdin, then EOF), copying its stdout and stderr as they
    /// arrive. Returns the exit status.
    pub fn stream_blocking(&self, cmd: &str, input: Option<&[u8]>, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32, SshError> {
        self.stream_input_blocking(cmd, input, None, out, err)
    }

    /// Run `cmd` (with `input` on its stdin), copying its output; `within` bounds the whole
    /// command: past it the connection counts as stalled (a dead peer can leave reads waiting
    /// for ever).
    fn stream_input_blocking(
        &self,
        cmd: &str,
        input: Option<&[u8]>,
        within: Option<Duration>,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> Result<i32, SshError> {
        let until = within.map(|w| std::time::Instant::now() + w);
        let addr = self.addr();
        let sess = self.session.lock().expect("ssh session lock");
        let mut ch = sess.channel_session().map_err(proto(&addr))?;
        ch.exec(cmd).map_err(proto(&addr))?;
        if let Some(input) = input {
            // Written whole before reading, in blocking mode: right for what sgbox sends (a key, a
            // JSON body) and for a file piped into `sgbox ssh -- CMD`. A command that echoes more
            // than the channel's window back before reading all of a large input would stall here.
            ch.write_all(input).map_err(|e| SshError::Protocol { addr: addr.clone(), message: e.to_string() })?;
            ch.send_eof().map_err(proto(&addr))?;
        }
        // Interleave both streams without blocking on either: poll in non-blocking mode.
        sess.set_blocking(false);
        let mut buf = [0u8; 16 * 1024];
        let mut next_keepalive = std::time::Instant::now();
        let result = (|| -> Result<(), SshError> {
            loop {
                if std::time::Instant::now() >= next_keepalive {
                    match sess.keepalive_send() {
                        Ok(secs) => next_keepalive = std::time::Instant::now() + Duration::from_secs(secs.max(1) as u64),
                        Err(e) if e.code() == ssh2::ErrorCode::Session(-37) => {}
                        Err(e) => return Err(SshError::Protocol { addr: addr.clone(), message: format!("keepalive: {}", e.message()) }),
                    }
                }
                if until.is_some_and(|u| std::time::Instant::now() >= u) {
                    return Err(SshError::Stalled { addr: addr.clone(), waited: within.unwrap_or_default() });
                }
                let mut progressed = false;
                for which in [0, 1] {
                    let n = if which == 0 { ch.read(&mut buf) } else { ch.stderr().read(&mut buf) };
                    match n {
                        Ok(0) => {}
                        Ok(n) => {
                            progressed = true;
                            let w: &mut dyn Write = if which == 0 { &mut *out } else { &mut *err };
                            // A reader that has seen enough says so by refusing stdout.
                            if w.write_all(&buf[..n]).is_err() && which == 0 {
                                return Err(SshError::Protocol { addr: addr.clone(), message: STOPPED.into() });
                            }
                            let _ = w.flush();
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(SshError::Protocol { addr: addr.clone(), message: e.to_string() }),
                    }
                }
                if ch.eof() && !progressed {
                    return Ok(());
                }
                if !progressed {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        })();
        sess.set_blocking(true);
        match result {
            Err(SshError::Protocol { message, .. }) if message == STOPPED => {
                // The command may run on (it is bounded on the box); the channel is ours to close.
                let _ = ch.close();
                return Ok(STOPPED_STATUS);
            }
            other => other?,
        }
        ch.wait_close().map_err(proto(&addr))?;
        ch.exit_status().map_err(proto(&addr))
    }

    /// Run `cmd`, handing each line of its stdout to `on_line` as it arrives, until the command
    /// ends (its exit status) or `on_line` returns true (then [`STOPPED_STATUS`], and the
    /// channel is closed). `within` bounds the whole command.
    pub fn watch_blocking(&self, cmd: &str, within: Duration, on_line: &mut dyn FnMut(&str) -> bool) -> Result<i32, SshError> {
        struct Lines<'a> {
            partial: Vec<u8>,
            on_line: &'a mut dyn FnMut(&str) -> bool,
        }
        impl Write for Lines<'_> {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.partial.extend_from_slice(b);
                while let Some(i) = self.partial.iter().position(|&c| c == b'\n') {
                    let line: Vec<u8> = self.partial.drain(..=i).collect();
                    if (self.on_line)(String::from_utf8_lossy(&line).trim_end()) {
                        return Err(std::io::Error::other(STOPPED));
                    }
                }
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut out = Lines { partial: Vec::new(), on_line };
        self.stream_input_blocking(cmd, None, Some(within), &mut out, &mut std::io::sink())
    }

    pub async fn exec(&self, cmd: &str) -> Result<Output, SshError> {
        self.exec_input(cmd, None).await
    }

    pub async fn exec_input(&self, cmd: &str, input: Option<Vec<u8>>) -> Result<Output, SshError> {
        self.exec_within(cmd, input, None).await
    }

    pub async fn exec_within(&self, cmd: &str, input: Option<Vec<u8>>, within: Option<Duration>) -> Result<Output, SshError> {
        let me = self.clone();
        let cmd = cmd.to_string();
        tokio::task::spawn_blocking(move || me.exec_input_blocking(&cmd, input.as_deref(), within)).await.expect("ssh exec task")
    }
}

/// The `ssh` command line a person would type for this box.
pub fn command_line(target: &Target, known_hosts: &Path) -> String {
    format!(
        "ssh -i {} -p {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes {USER}@{}",
        target.key.display(),
        target.port,
        known_hosts.display(),
        target.host
    )
}

/// The known_hosts line pinning `key` for the target (OpenSSH's `[host]:port` form).
/// Rewrite `path` to hold exactly the line for this address, port and key, when it does not
/// already (the Elastic IP or the forwarded port changed, or the pin did). Returns whether it
/// wrote.
pub fn ensure_known_hosts(path: &std::path::Path, target: &Target, key: &str) -> anyhow::Result<bool> {
    let want = known_hosts_line(target, key);
    if std::fs::read_to_string(path).ok().as_deref() == Some(want.as_str()) {
        return Ok(false);
    }
    crate::state::write_atomic(path, want.as_bytes(), 0o600)?;
    Ok(true)
}

pub fn known_hosts_line(target: &Target, key: &str) -> String {
    let host = if target.port == 22 { target.host.clone() } else { format!("[{}]:{}", target.host, target.port) };
    format!("{host} {key}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_follows_the_address_and_port() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("known_hosts");
        let a = Target { host: "198.51.100.7".into(), port: 22, key: "/k".into() };
        assert!(ensure_known_hosts(&p, &a, "ssh-ed25519 AAAA").unwrap());
        assert!(!ensure_known_hosts(&p, &a, "ssh-ed25519 AAAA").unwrap(), "unchanged: not written");
        let b = Target { host: "203.0.113.9".into(), port: 2222, key: "/k".into() };
        assert!(ensure_known_hosts(&p, &b, "ssh-ed25519 AAAA").unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "[203.0.113.9]:2222 ssh-ed25519 AAAA\n");
    }

    #[test]
    fn known_hosts_uses_bracketed_ports() {
        let t = Target { host: "127.0.0.1".into(), port: 10022, key: "/k".into() };
        assert_eq!(known_hosts_line(&t, "ssh-ed25519 AAAA"), "[127.0.0.1]:10022 ssh-ed25519 AAAA\n");
        let t = Target { host: "203.0.113.7".into(), port: 22, key: "/k".into() };
        assert_eq!(known_hosts_line(&t, "ssh-ed25519 AAAA"), "203.0.113.7 ssh-ed25519 AAAA\n");
        assert!(command_line(&t, Path::new("/s/known_hosts")).contains("StrictHostKeyChecking=yes"));
    }
}
