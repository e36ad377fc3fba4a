//! Harness for the local-box end-to-end tests: the base image (built with `sgbox image build`),
//! a real registry (Debian's docker-registry) on 127.0.0.1 holding the stand-in images, and a
//! scratch state folder. Everything started is stopped by PID on drop. Missing host tools fail
//! the test with what to install; nothing is skipped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{run, sgbox, text};

pub const INSTALL_HINT: &str =
    "run `bash .ci/setup` (installs qemu-system-x86 from bookworm-backports, qemu-utils, debootstrap, genisoimage, docker-registry, busybox-static)";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn require_tools() {
    for tool in ["qemu-system-x86_64", "qemu-img", "debootstrap", "genisoimage", "docker-registry", "python3"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|d| d.join(tool).is_file());
        assert!(found, "{tool} is not installed: {INSTALL_HINT}");
    }
    assert!(Path::new("/bin/busybox").is_file(), "/bin/busybox (busybox-static) is missing: {INSTALL_HINT}");
}

pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

/// The Debian 13 base image, built once into the per-user cache (reused while its recipe holds).
pub fn base_image() -> PathBuf {
    require_tools();
    let scratch = tempfile::tempdir().unwrap();
    let out = run(sgbox(scratch.path()).args(["image", "build", "--cloud", "local", "--output", "json"]));
    assert!(out.status.success(), "`sgbox image build --cloud local` failed ({INSTALL_HINT}):\n{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("image build prints JSON");
    PathBuf::from(v["dir"].as_str().expect("dir"))
}

pub struct Registry {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        require_tools();
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry { child: None, port: 0, dir };
        // Port 0 first (the kernel's pick, reported in the log: a port picked here could be taken
        // by another test's server before the registry binds it), then that port for `resume`.
        r.configure(0);
        r.resume();
        r.configure(r.port);
        r
    }

    fn configure(&self, port: u16) {
        let data = self.dir.path().join("data");
        std::fs::write(
            self.dir.path().join("config.yml"),
            format!("version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n", data.display()),
        )
        .unwrap();
    }

    /// Stop serving (the port refuses connections); the pushed images stay for `resume`.
    pub fn pause(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err(), "nothing answers on the registry's port now");
    }

    /// Serve again, on the same port, with what was pushed. Done when this registry's log says
    /// it listens, not when something answers on the port.
    pub fn resume(&mut self) {
        let log_path = self.dir.path().join("registry.log");
        let listening = |log: &str| {
            log.lines()
                .filter_map(|l| l.split("msg=\"listening on 127.0.0.1:").nth(1))
                .filter_map(|p| p.split('"').next()?.parse::<u16>().ok())
                .collect::<Vec<_>>()
        };
        let before = listening(&std::fs::read_to_string(&log_path).unwrap_or_default()).len();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start docker-registry ({e}): {INSTALL_HINT}"));
        let until = Instant::now() + Duration::from_secs(20);
        let port = loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(p) = listening(&log).get(before) {
                break *p;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("docker-registry exited ({status}) before listening:\n{log}");
            }
            assert!(Instant::now() < until, "docker-registry did not listen within 20 s:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        };
        // Logged once its socket listens: connections wait in the backlog until it accepts.
        self.child = Some(child);
        self.port = port;
    }

    /// Push one stand-in image per official image of each release.
    pub fn push_standins(&self, releases: &[&str]) {
        let mut cmd = Command::new("python3");
        cmd.current_dir(repo()).arg("tests/harness/standins.py").args(["push", "--build", "--registry", &format!("127.0.0.1:{}", self.port)]);
        cmd.args(["--catalog", "data/sourcegraph-compose-releases.json"]);
        for r in releases {
            cmd.args(["--release", r]);
        }
        let out = cmd.output().expect("python3 runs");
        assert!(out.status.success(), "pushing stand-ins failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    }

    /// The mirror setting as the guest sees the host.
    pub fn mirror_for_guest(&self) -> String {
        format!("http://10.0.2.2:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.pause_quietly();
    }
}

impl Registry {
    fn pause_quietly(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// QEMU processes whose command line mentions `needle` (an overlay path), from /proc.
pub fn qemu_pids(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let s = String::from_utf8_lossy(&c);
                s.starts_with("qemu-system-x86_64")
                    && s.contains(needle)
                    && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z")
            })
        })
        .collect()
}

/// GET a URL's body (None when it does not answer 2xx).
pub fn http_get(url: &str) -> Option<String> {
    let out = Command::new("curl").args(["-fsS", "-m", "5", url]).output().ok()?;
    out.status.success().then(|| text(&out.stdout))
}
