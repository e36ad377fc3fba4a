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

/// The last complete block of each kind in the console text (a rebooted box prints again; the
/// latest boot is the one answering). A block without its END line is not trusted: the console
/// may have been read while it was being printed, or cut.
pub fn parse_console(text: &str) -> ConsoleHostKeys {
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let block = |begin: &str, end: &str| -> Vec<&str> {
        let mut from = lines.len();
        while let Some(start) = lines[..from].iter().rposition(|l| l.contains(begin)) {
            let body: Vec<&str> = lines[start + 1..].iter().take_while(|l| !l.contains(end) && !l.contains(begin)).copied().collect();
            if lines.get(start + 1 + body.len()).is_some_and(|l| l.contains(end)) {
                return body;
            }
            from = start;
        }
        vec![]
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

/// A complete fingerprint block with `keys`' fingerprints, in the console's own format.
pub fn fingerprint_block(keys: &ConsoleHostKeys) -> Option<String> {
    if keys.fingerprints.is_empty() {
        return None;
    }
    let mut s = format!("{FP_BEGIN}\n");
    for f in &keys.fingerprints {
        s.push_str(&format!("{f}\n"));
    }
    s.push_str(&format!("{FP_END}\n"));
    Some(s)
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
    fn a_block_without_its_end_line_is_not_trusted() {
        let end = CONSOLE.find(FP_END).unwrap();
        let cut = &CONSOLE[..end];
        assert!(parse_console(cut).fingerprints.is_empty(), "a cut-off block is not a list of fingerprints");
        // An earlier complete block (an earlier boot) still counts when the latest one is cut.
        let twice = format!("{CONSOLE}\n{cut}");
        assert_eq!(parse_console(&twice), parse_console(CONSOLE));
        // The box's own reprint (sgbox-hostkeys, after the stack starts) reads the same.
        let reprint = format!("noise\n{}", sgbox_block(&parse_console(CONSOLE).fingerprints));
        assert_eq!(parse_console(&reprint).fingerprints, parse_console(CONSOLE).fingerprints);
    }

    /// What the box's timer prints (see the rendered `sgbox-hostkeys` unit).
    fn sgbox_block(fps: &[String]) -> String {
        let mut s = format!("{FP_BEGIN}\n");
        for f in fps {
            s.push_str(&format!("256 {f} root@box (ED25519)\n"));
        }
        s.push_str(&format!("{FP_END}\n"));
        s
    }

    #[test]
    fn nothing_printed_yet_is_not_trust() {
        let early: String = CONSOLE.lines().take(300).collect::<Vec<_>>().join("\n");
        let c = parse_console(&early);
        assert_eq!(verify(&parse_console(CONSOLE).keys[0], &c), Err(HostKeyError::NotPrinted));
    }
}
