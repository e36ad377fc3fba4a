//! A test server on a port of its own: told to listen on a port the kernel picks, it writes that
//! port to a file. Shared by `tests/it` and the unit tests of `src/cloud/aws` (by `#[path]`).

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Starts a server told to listen on a port the kernel picks (`-p 0`/`--port 0` and
/// `--port-file`) and returns it with that port once it listens. A port picked here and bound by
/// the server a second later can be taken in between by another test's server (tests and test
/// binaries run side by side), and the test would then talk to that one.
pub fn spawn_on_own_port(cmd: &mut Command, port_file: &Path, what: &str) -> (Child, u16) {
    let mut child = cmd.arg("--port-file").arg(port_file).spawn().unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(port) = std::fs::read_to_string(port_file).ok().and_then(|p| p.trim().parse::<u16>().ok()) {
            return (child, port);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening ({status})");
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not listen within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
