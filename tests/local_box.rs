//! End-to-end: `sgbox up --cloud local` boots a real QEMU VM (Debian 13 built with debootstrap,
//! real cloud-init, sshd, Docker and Compose v2), which pulls stand-in Sourcegraph images from a
//! real registry on this machine and must come up healthy at the release. One box is shared by
//! the scenarios (a boot takes minutes under TCG): idempotent re-run, reboot recovery, a changed
//! host key refused, and `down` (data disk kept, then deleted).
//!
//! Needs qemu-system-x86, qemu-utils, debootstrap, genisoimage, docker-registry, busybox-static
//! and root (debootstrap): `bash .ci/setup`. Missing tools fail the test; nothing is skipped.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::localbox::{base_image, free_port, http_get, qemu_pids, Registry};
use common::{run, sgbox, text};
use serde_json::Value;

const RELEASE: &str = "7.5.4453";

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", text(&out.stdout), text(&out.stderr)))
}

fn console_tail(state: &Path, name: &str) -> String {
    let log = std::fs::read_to_string(state.join(name).join("local/console.log")).unwrap_or_default();
    log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn ssh(state: &Path, name: &str, cmd: &str) -> std::process::Output {
    run(sgbox(state).args(["ssh", "--name", name, "--", cmd]))
}

fn wait_healthy(state: &Path, name: &str, within: Duration) -> Value {
    let until = Instant::now() + within;
    loop {
        let out = run(sgbox(state).args(["status", "--name", name, "--output", "json"]));
        if out.status.success() {
            let v = json_of(&out);
            if v["healthy"] == Value::Bool(true) {
                return v;
            }
            if Instant::now() > until {
                panic!("not healthy within {within:?}: {v:#}\nconsole:\n{}", console_tail(state, name));
            }
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

#[test]
fn local_box_lifecycle() {
    let image = base_image();
    let registry = Registry::start();
    registry.push_standins(&[RELEASE]);
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let name = "e2e";
    let up_args = |extra: &[&str]| {
        let mut a: Vec<String> = ["up", "--cloud", "local", "--name", name, "--version", RELEASE, "--registry-mirror"].iter().map(|s| s.to_string()).collect();
        a.push(registry.mirror_for_guest());
        a.extend(["--mirror-mode", "tags-only", "--base-image"].iter().map(|s| s.to_string()));
        a.push(image.display().to_string());
        a.extend(["--yes", "--output", "json", "--timeout", "25m"].iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    // 1. Up: healthy at the release, checked independently of sgbox's own wait.
    let t0 = Instant::now();
    let out = run(sgbox(st).args(up_args(&[])));
    assert!(out.status.success(), "up failed: {}\nconsole:\n{}", text(&out.stderr), console_tail(st, name));
    let up = json_of(&out);
    eprintln!("up took {:.0} s: {}", t0.elapsed().as_secs_f64(), up["timings"]);
    assert_eq!(up["release"], RELEASE);
    let url = up["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert_eq!(http_get(&format!("{url}/__version")).as_deref().map(str::trim), Some(RELEASE));
    assert!(up["ssh"]["host_key_fingerprint"].as_str().unwrap_or("").starts_with("SHA256:"), "host key pinned: {up:#}");
    let overlay = st.join(name).join("local/overlay.qcow2");
    let data = st.join(name).join("local/data.qcow2");
    let pids = qemu_pids(&overlay.display().to_string());
    assert_eq!(pids.len(), 1, "one VM: {pids:?}");
    let mut stderr_all = text(&out.stderr);

    let status = wait_healthy(st, name, Duration::from_secs(60));
    let services = status["services"].as_array().unwrap();
    assert!(services.len() >= 20, "every compose service is reported: {status:#}");
    assert_eq!(status["unhealthy"], Value::Array(vec![]));

    // The box is the one rendered: data on the separate disk, Docker's root there, SSH only for sgbox.
    let out = ssh(st, name, "findmnt -n -o SOURCE,FSTYPE /mnt/sgbox-data; sudo docker info --format '{{.DockerRootDir}}'; sudo sshd -T | grep -i '^allowusers'; cloud-init status");
    let o = text(&out.stdout);
    assert!(out.status.success(), "{o}\n{}", text(&out.stderr));
    assert!(o.contains("ext4"), "data disk mounted: {o}");
    assert!(o.contains("/mnt/sgbox-data/docker"), "docker root on the data disk: {o}");
    assert!(o.contains("allowusers sgbox"), "sshd restricted: {o}");
    assert!(o.contains("status: done"), "{o}");
    // Secrets never leave the state folder through our output.
    let secrets = std::fs::read_to_string(st.join(name).join("secrets.json")).unwrap();
    let pw: Value = serde_json::from_str(&secrets).unwrap();
    stderr_all.push_str(&text(&out.stderr));

    // 2. Re-running `up` on the running box changes nothing and answers at once.
    let out = run(sgbox(st).args(up_args(&[])));
    assert!(out.status.success(), "re-run: {}", text(&out.stderr));
    let again = json_of(&out);
    assert_eq!(again["url"], up["url"], "same ports");
    assert_eq!(again["instance_id"], up["instance_id"]);
    assert_eq!(qemu_pids(&overlay.display().to_string()), pids, "no second VM");
    stderr_all.push_str(&text(&out.stderr));
    for p in [&pw["pgsql_password"], &pw["codeintel_db_password"], &pw["codeinsights_db_password"]] {
        let p = p.as_str().unwrap();
        assert!(!stderr_all.contains(p) && !text(&out.stdout).contains(p), "a password was printed");
    }

    // 3. A reboot of the VM brings the stack back by itself.
    let boot_id = text(&ssh(st, name, "cat /proc/sys/kernel/random/boot_id").stdout).trim().to_string();
    assert_eq!(boot_id.len(), 36, "{boot_id}");
    let _ = ssh(st, name, "sudo systemd-run --on-active=1 systemctl reboot");
    let until = Instant::now() + Duration::from_secs(120);
    while http_get(&format!("{url}/__version")).is_some() {
        assert!(Instant::now() < until, "the box never went down for the reboot");
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = wait_healthy(st, name, Duration::from_secs(900));
    assert_eq!(after["release"], RELEASE);
    let boot_id2 = text(&ssh(st, name, "cat /proc/sys/kernel/random/boot_id").stdout).trim().to_string();
    assert_ne!(boot_id, boot_id2, "the guest really rebooted");
    assert_eq!(http_get(&format!("{url}/__version")).as_deref().map(str::trim), Some(RELEASE));

    // 4. A changed host key is refused (the pinned one no longer matches).
    let out = ssh(st, name, "sudo sh -c 'rm -f /etc/ssh/ssh_host_*_key* && ssh-keygen -q -A && systemctl restart ssh'");
    assert!(out.status.success(), "regenerating host keys: {}", text(&out.stderr));
    let out = ssh(st, name, "true");
    assert_eq!(out.status.code(), Some(1), "must refuse: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("refusing") && err.contains("pinned"), "{err}");

    // 5. Down: no process, no overlay; the data disk stays unless asked.
    let out = run(sgbox(st).args(["down", "--name", name, "--yes", "--output", "json"]));
    assert!(out.status.success(), "down: {}", text(&out.stderr));
    let down = json_of(&out);
    assert_eq!(down["remaining"], Value::Array(vec![]));
    assert!(qemu_pids(&overlay.display().to_string()).is_empty(), "QEMU still running");
    for p in &pids {
        assert!(!Path::new(&format!("/proc/{p}")).exists() || std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default().contains(") Z"));
    }
    assert!(!overlay.exists(), "overlay left behind");
    assert!(data.exists(), "data disk must be kept");
    assert!(st.join(name).join("secrets.json").exists(), "secrets kept with the data disk");

    let out = run(sgbox(st).args(["down", "--name", name, "--cloud", "local", "--delete-data", "--yes"]));
    assert!(out.status.success(), "down --delete-data: {}", text(&out.stderr));
    assert!(!data.exists(), "data disk deleted on request");
    assert!(!st.join(name).exists(), "nothing left in the state folder");
    drop(registry);
}

#[test]
fn local_bad_input_leaves_nothing_behind() {
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let fake = st.join("fake.qcow2");
    std::fs::write(&fake, b"QFI\xfb\0\0\0\x03").unwrap();
    let check = |args: &[&str], path: Option<&str>, field: &str| {
        let mut c = sgbox(&st.join("state"));
        c.args(["up", "--cloud", "local", "--yes"]).args(args);
        if let Some(p) = path {
            c.env("PATH", p);
        }
        let out = run(&mut c);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(field) && err.contains("fix:"), "{args:?} names {field} and a fix: {err}");
        assert!(!st.join("state").exists(), "{args:?} created state");
    };
    check(&["--base-image", "/nonexistent/debian-13.qcow2"], None, "base-image");
    check(&["--base-image", st.join("fake.qcow2").to_str().unwrap(), "--accel", "warp"], None, "accel");
    check(&["--base-image", fake.to_str().unwrap()], Some(st.to_str().unwrap()), "QEMU is not installed");

    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    check(&["--base-image", fake.to_str().unwrap(), "--ssh-port", &port], None, "ssh-port");
    let p2 = free_port().to_string();
    check(&["--base-image", fake.to_str().unwrap(), "--http-port", &p2, "--https-port", &p2], None, "port");
    check(&["--base-image", fake.to_str().unwrap(), "--timeout", "soon"], None, "timeout");
}
