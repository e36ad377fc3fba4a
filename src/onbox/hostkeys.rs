//! Host-key pinning from the console: cloud-init prints the new VM's SSH host key fingerprints
//! (and the keys) on the serial console, which reaches sgbox through a channel the network cannot
//! forge — the local serial log, EC2 GetConsoleOutput, GCE serial port output. sgbox trusts a
//! host key on first contact only if it is one of those.
// Used by `up` (local box, then AWS/GCP) as those land; tested here on real console output.
#![cfg_attr(not(test), allow(dead_code))]

use ssh_key::{HashAlg, PublicKey};

const FP_BEGIN: &str = "-----BEGIN SSH HOST KEY FINGERPRINTS-----";
const FP_END: &str = "-----END SSH HOST KEY FINGERPRINTS-----";
const KEYS_BEGIN: &str = "-----BEGIN SSH HOST KEY KEYS-----";
const KEYS_END: &str = "-----END SSH HOST KEY KEYS-----";

/// What one boot's cloud-init printed about its host keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsoleHostKeys {
    /// `SHA256:…` fingerprints.
    pub fingerprints: Vec<String>,
    /// OpenSSH public keys (`type base64`), without comments.
    pub keys: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostKeyError {
    #[error("the console shows no SSH host key fingerprints yet (cloud-init has not finished its first boot)")]
    NotPrinted,
    #[error("the box offered host key {offered}, but its console lists only {printed}: refusing to connect (a changed or intercepted host); pass --insecure-accept-host-key only if you know why")]
    Mismatch { offered: String, printed: String },
    #[error("cannot read the host key the box offered: {0}")]
    Unreadable(String),
}

/// The last block of each kind in the console text (a rebooted box prints again; the latest
/// boot is the one answering).
pub fn parse_console(text: &str) -> ConsoleHostKeys {
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let block = |begin: &str, end: &str| -> Vec<&str> {
        let Some(start) = lines.iter().rposition(|l| l.contains(begin)) else { return vec![] };
        lines[start + 1..].iter().take_while(|l| !l.contains(end)).copied().collect()
    };
    let fingerprints =
        block(FP_BEGIN, FP_END).into_iter().filter_map(|l| l.split_whitespace().find(|w| w.starts_with("SHA256:")).map(str::to_string)).collect();
    let keys = block(KEYS_BEGIN, KEYS_END)
        .into_iter()
        .filter_map(|l| {
            // Console lines may carry a syslog or kernel prefix; the key starts at its type.
            let at = ["ssh-ed25519 ", "ecdsa-sha2-", "ssh-rsa ", "sk-"].iter().filter_map(|t| l.find(t)).min()?;
            let mut parts = l[at..].split_whitespace();
            Some(format!("{} {}", parts.next()?, parts.next()?))
        })
        .collect();
    ConsoleHostKeys { fingerprints, keys }
}

/// SHA-256 fingerprint of an OpenSSH public key line, as ssh-keygen prints it.
pub fn fingerprint(openssh: &str) -> Result<String, HostKeyError> {
    let key = PublicKey::from_openssh(openssh.trim()).map_err(|e| HostKeyError::Unreadable(e.to_string()))?;
    Ok(key.fingerprint(HashAlg::Sha256).to_string())
}

/// Accept `offered` (an OpenSSH public key line) only if the console printed its fingerprint.
pub fn verify(offered: &str, console: &ConsoleHostKeys) -> Result<String, HostKeyError> {
    if console.fingerprints.is_empty() {
        return Err(HostKeyError::NotPrinted);
    }
    let fp = fingerprint(offered)?;
    if console.fingerprints.contains(&fp) {
        Ok(fp)
    } else {
        Err(HostKeyError::Mismatch { offered: fp, printed: console.fingerprints.join(", ") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real first boot of the Debian 13 box (cloud-init 25.1.4) captured from the serial log.
    const CONSOLE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/console-local-debian13.log"));

    #[test]
    fn parses_real_cloud_init_console_output() {
        let c = parse_console(CONSOLE);
        assert_eq!(c.fingerprints, vec!["SHA256:+wecoozVfVXxhuIxe+J+om1O1F3Zzs3s5C7frvpFRAM", "SHA256:xnguWCsTvl5rNOChT0tauHCfU45RLR52GkwfZa8vDQc"]);
        assert_eq!(c.keys.len(), 2);
        assert!(c.keys[1].starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMFT1EE"));
        // Our fingerprinting agrees with what cloud-init (ssh-keygen) printed for the same keys.
        for k in &c.keys {
            assert_eq!(verify(k, &c).unwrap(), fingerprint(k).unwrap());
        }
    }

    #[test]
    fn crlf_consoles_parse_the_same() {
        // EC2 and GCE consoles arrive with CRLF line ends.
        assert_eq!(parse_console(&CONSOLE.replace('\n', "\r\n")), parse_console(CONSOLE));
    }

    #[test]
    fn a_different_key_is_refused() {
        let c = parse_console(CONSOLE);
        let other = ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
        let line = other.public_key().to_openssh().unwrap();
        match verify(&line, &c) {
            Err(HostKeyError::Mismatch { offered, printed }) => {
                assert_eq!(offered, fingerprint(&line).unwrap());
                assert!(printed.contains("SHA256:xnguWCsTvl5rNOChT0tauHCfU45RLR52GkwfZa8vDQc"));
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }

    #[test]
    fn nothing_printed_yet_is_not_trust() {
        let early: String = CONSOLE.lines().take(300).collect::<Vec<_>>().join("\n");
        let c = parse_console(&early);
        assert_eq!(verify(&parse_console(CONSOLE).keys[0], &c), Err(HostKeyError::NotPrinted));
    }
}
