//! Test helpers for the box's shell fragments: run under a real `sh`, with the box's own commands
//! (`systemctl`, `docker`, `curl`, `sudo`) played by scripts put first on PATH.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

/// An executable script `dir/name` that runs `body` under `/bin/sh`.
pub fn fake_tool(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `sh -c script` with `dir` first on PATH, so its fake tools answer instead of the real ones.
pub fn sh_on_path(dir: &Path, script: &str) -> Output {
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    Command::new("sh").args(["-c", script]).env("PATH", path).output().unwrap()
}
