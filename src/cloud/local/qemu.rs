//! QEMU as a process: the command line of a box, daemonized start, the QMP control socket
//! (status, ACPI power button, internal snapshots), finding our VMs by their overlay path in
//! /proc (never trusting the pidfile alone), and the KVM probe.
//!
//! KVM is used only when a probe boot shows it runs a stock kernel: on some hosts /dev/kvm exists
//! but cannot (PVM-only KVM starts the guest and then fails in its instruction emulator).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;

use rustix::process::{Pid, Signal};

use super::image::BootImage;
use crate::settings::Accel;

pub const QEMU: &str = "qemu-system-x86_64";
/// The data disk: its block node (`-drive id=`, and `node-name` when hot-plugged again) and its
/// virtio device, which `swap_data_disk` unplugs and plugs back.
pub const DATA_NODE: &str = "data";
pub const DATA_DEVICE: &str = "data-disk";

#[derive(Clone)]
pub struct VmFiles {
    pub overlay: PathBuf,
    pub data: PathBuf,
    pub seed: PathBuf,
    pub console: PathBuf,
    pub pidfile: PathBuf,
    pub qmp: PathBuf,
}

impl VmFiles {
    pub fn in_dir(dir: &Path) -> VmFiles {
        VmFiles {
            overlay: dir.join("overlay.qcow2"),
            data: dir.join("data.qcow2"),
            seed: dir.join("seed.iso"),
            console: dir.join("console.log"),
            pidfile: dir.join("qemu.pid"),
            qmp: dir.join("qmp.sock"),
        }
    }
}

pub struct Ports {
    pub ssh: u16,
    pub http: u16,
    pub https: u16,
}

pub struct Vm {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
}

/// The CPU an emulated (TCG) box gets: x86-64-v2 on QEMU's plain 64-bit model, not `max`. Under
/// emulation every CPU feature the guest uses costs host instructions: with `max` the guest's
/// libraries take AVX2 paths and its kernel 5-level paging, protection keys and PCID, all emulated
/// in software. Measured on one box, powered off and booted again until `/__version` answered
/// (boot and a 27-service stack start): `max` 98.5, 96.9, 99.6 s; this model 82.2, 81.1, 91.0 s
/// (0.86×); `max` without AVX 89.4 s, without la57/pku/pcid 91.0 s. x86-64-v2 is what Debian 13,
/// Docker, Go and PostgreSQL run on (they need at most v1). With KVM the box gets the host's CPU.
pub const TCG_CPU: &str = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16";

/// The QEMU arguments of a box (without the program).
pub fn args(m: &Vm, image: &BootImage, f: &VmFiles, p: &Ports) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&["-name", &format!("sgbox-{}", m.name)]);
    match m.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        _ => push(&["-accel", "tcg", "-cpu", TCG_CPU]),
    }
    push(&["-smp", &m.vcpus.to_string(), "-m", &m.memory_mib.to_string()]);
    push(&["-display", "none", "-daemonize", "-pidfile", &f.pidfile.display().to_string()]);
    // Appended, so the console of the first boot (the host-key fingerprints) survives restarts.
    push(&["-chardev", &format!("file,id=console,path={},append=on", f.console.display()), "-serial", "chardev:console"]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", f.qmp.display())]);
    push(&["-monitor", "none"]);
    if let Some(k) = &image.kernel {
        push(&["-kernel", &k.vmlinuz.display().to_string(), "-initrd", &k.initrd.display().to_string()]);
        push(&["-append", &format!("{} panic=-1", k.cmdline)]);
    }
    push(&["-drive", &format!("file={},if=none,id=root,format=qcow2,discard=unmap", f.overlay.display())]);
    // Direct kernel boot claims boot index 0 itself; a disk image boots from its own loader.
    push(&["-device", if image.kernel.is_some() { "virtio-blk-pci,drive=root" } else { "virtio-blk-pci,drive=root,bootindex=0" }]);
    // The serial gives the data disk a stable /dev/disk/by-id/virtio-sgbox-data for the cloud-init.
    push(&["-drive", &format!("file={},if=none,id={DATA_NODE},format=qcow2,discard=unmap", f.data.display())]);
    push(&["-device", &format!("virtio-blk-pci,drive={DATA_NODE},serial={},id={DATA_DEVICE}", crate::render::DATA_DISK_SERIAL)]);
    push(&["-drive", &format!("file={},if=none,id=seed,format=raw,readonly=on", f.seed.display())]);
    push(&["-device", "virtio-blk-pci,drive=seed"]);
    push(&[
        "-netdev",
        &format!("user,id=net0,hostfwd=tcp:127.0.0.1:{}-:22,hostfwd=tcp:127.0.0.1:{}-:80,hostfwd=tcp:127.0.0.1:{}-:443", p.ssh, p.http, p.https),
    ]);
    // No option ROM: the box never network-boots, and the iPXE ROM package may be absent.
    push(&["-device", "virtio-net-pci,netdev=net0,romfile=", "-device", "virtio-rng-pci"]);
    a
}

#[derive(Debug)]
pub enum StartError {
    /// A forwarded port was taken between our check and QEMU's bind.
    PortTaken(String),
    Failed(String),
}

/// Start QEMU daemonized: it returns once the VM runs, or with the error (bad image, port in use).
pub fn start(args: &[String]) -> Result<u32, StartError> {
    let out = Command::new(QEMU).args(args).stdin(Stdio::null()).output().map_err(|e| StartError::Failed(format!("cannot run {QEMU}: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        if stderr.contains("host forwarding rule") {
            return Err(StartError::PortTaken(stderr));
        }
        return Err(StartError::Failed(format!("{QEMU} exited with {}: {stderr}", out.status)));
    }
    let pidfile = args.iter().position(|a| a == "-pidfile").and_then(|i| args.get(i + 1)).expect("args include -pidfile");
    let pid = fs::read_to_string(pidfile).ok().and_then(|t| t.trim().parse().ok());
    pid.ok_or_else(|| StartError::Failed(format!("{QEMU} started but wrote no pid to {pidfile}")))
}

/// PIDs of QEMU processes using `overlay`: found in /proc, so a lost pidfile hides nothing.
pub fn find_vms(overlay: &Path) -> Vec<u32> {
    let needle = format!("file={},", overlay.display());
    let Ok(rd) = fs::read_dir("/proc") else { return vec![] };
    let mut pids: Vec<u32> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<String> = c.split(|b| *b == 0).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
                args.first().is_some_and(|p| p.ends_with(QEMU)) && args.iter().any(|a| a.starts_with(&needle))
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

pub fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent's reaping is missing.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// Signal our VM's process (found in /proc by its overlay path); a gone process is fine.
pub fn kill(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// One QMP command on the VM's control socket.
pub fn qmp(socket: &Path, command: &str, arguments: Option<Value>) -> Result<Value, String> {
    let stream = UnixStream::connect(socket).map_err(|e| format!("QMP {}: {e}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("QMP greeting: {e}"))?;
    let mut call = |cmd: &str, args: Option<Value>| -> Result<Value, String> {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        writeln!(w, "{msg}").map_err(|e| format!("QMP {cmd}: {e}"))?;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(|e| format!("QMP {cmd}: {e}"))? == 0 {
                return Err(format!("QMP {cmd}: connection closed"));
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| format!("QMP {cmd}: {e}"))?;
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = v.get("error") {
                return Err(format!("QMP {cmd}: {}", err["desc"].as_str().unwrap_or("error")));
            }
            // Asynchronous events arrive interleaved; skip them.
        }
    };
    call("qmp_capabilities", None)?;
    call(command, arguments)
}

/// Ask the guest to power off (ACPI button), wait, then escalate to QMP quit and Signal::KILL.
pub fn stop(pid: u32, qmp_socket: &Path, grace: Duration) -> bool {
    let wait = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if !alive(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        !alive(pid)
    };
    if qmp(qmp_socket, "system_powerdown", None).is_ok() && wait(grace) {
        return true;
    }
    if qmp(qmp_socket, "quit", None).is_ok() && wait(Duration::from_secs(10)) {
        return true;
    }
    kill(pid, Signal::TERM);
    if wait(Duration::from_secs(10)) {
        return true;
    }
    kill(pid, Signal::KILL);
    wait(Duration::from_secs(10))
}

#[derive(Serialize, Deserialize)]
struct ProbeCache {
    key: String,
    kvm_works: bool,
    detail: String,
}

/// /dev/kvm exists and we may open it (whether it can boot a stock kernel is the probe's question).
pub fn kvm_device_usable() -> bool {
    fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// What to run the VM with, and a note for the user when KVM was wanted but cannot be used.
pub fn choose_accel(wanted: Accel, image: &BootImage, cache: &Path) -> Result<(Accel, Option<String>), String> {
    let usable = kvm_device_usable();
    match wanted {
        Accel::Tcg => return Ok((Accel::Tcg, None)),
        Accel::Kvm if !usable => return Err("KVM was asked for (accel = kvm) but /dev/kvm is missing or not accessible".into()),
        Accel::Kvm => return Ok((Accel::Kvm, None)),
        Accel::Auto if !usable => {
            return Ok((Accel::Tcg, Some("no usable /dev/kvm: running under TCG software emulation (boots take 1–2 minutes)".into())))
        }
        Accel::Auto => {}
    }
    let key = probe_key(image);
    let cache_file = cache.join("kvm-probe.json");
    let cached = fs::read_to_string(&cache_file).ok().and_then(|t| serde_json::from_str::<ProbeCache>(&t).ok()).filter(|c| c.key == key);
    let result = match cached {
        Some(c) => c,
        None => {
            let (kvm_works, detail) = probe_kvm(image, cache);
            let c = ProbeCache { key, kvm_works, detail };
            let _ = fs::create_dir_all(cache);
            let _ = crate::state::write_atomic(&cache_file, serde_json::to_string_pretty(&c).unwrap_or_default().as_bytes(), 0o644);
            c
        }
    };
    if result.kvm_works {
        Ok((Accel::Kvm, None))
    } else {
        Ok((
            Accel::Tcg,
            Some(format!("KVM cannot boot a stock kernel on this host ({}): using TCG software emulation (boots take 1–2 minutes)", result.detail)),
        ))
    }
}

/// What the KVM probe's answer depends on: the host's kernel, QEMU, and the guest kernel by its
/// content (a baked image, wherever it was put, boots its base image's kernel: one probe for both).
fn probe_key(image: &BootImage) -> String {
    let kernel = match &image.kernel {
        Some(k) => fs::read(&k.vmlinuz)
            .map(|b| format!("sha256:{}", crate::cloud::hex(&sha2::Sha256::digest(&b))))
            .unwrap_or_else(|_| k.vmlinuz.display().to_string()),
        None => image.disk.display().to_string(),
    };
    format!("{}|{}|{kernel}", fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(), qemu_version())
}

fn qemu_version() -> String {
    Command::new(QEMU)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default()
}

/// Boot the image's kernel under KVM with no root disk: a working KVM reaches the kernel's
/// "cannot mount root" panic in a second or two; a broken one prints nothing or dies.
fn probe_kvm(image: &BootImage, scratch: &Path) -> (bool, String) {
    let log = scratch.join(format!("kvm-probe-{}.log", std::process::id()));
    let err_log = scratch.join(format!("kvm-probe-{}.err", std::process::id()));
    let _ = fs::create_dir_all(scratch);
    let _ = fs::remove_file(&log);
    let Ok(err_file) = fs::File::create(&err_log) else {
        return (false, format!("cannot write {}", err_log.display()));
    };
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", "kvm", "-cpu", "host", "-m", "512", "-smp", "1", "-display", "none", "-monitor", "none", "-no-reboot"]);
    cmd.arg("-serial").arg(format!("file:{}", log.display()));
    let markers: &[&str] = match &image.kernel {
        Some(k) => {
            cmd.arg("-kernel").arg(&k.vmlinuz).args(["-append", "console=ttyS0 panic=-1 root=/dev/sgbox-kvm-probe"]);
            &["Kernel panic", "VFS: Unable to mount root"]
        }
        None => {
            cmd.arg("-snapshot").arg("-drive").arg(format!("file={},if=virtio,format={}", image.disk.display(), image.format));
            &["Welcome to", "login:"]
        }
    };
    let Ok(mut child) = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err_file).spawn() else {
        let _ = fs::remove_file(&err_log);
        return (false, "qemu could not start".into());
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if markers.iter().any(|m| text.contains(m)) {
            break true;
        }
        // QEMU reports a KVM that cannot run the guest ("KVM internal error") and then pauses
        // it rather than exiting: the answer is known at once, not after the deadline.
        let failed = fs::read_to_string(&err_log).is_ok_and(|e| e.contains("KVM internal error"));
        if failed || child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
            break markers.iter().any(|m| fs::read_to_string(&log).unwrap_or_default().contains(m));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    let err = fs::read_to_string(&err_log).unwrap_or_default().lines().next().unwrap_or("").to_string();
    let _ = fs::remove_file(&log);
    let _ = fs::remove_file(&err_log);
    if seen {
        (true, "probe boot reached the kernel".into())
    } else {
        (false, if err.is_empty() { "probe boot printed nothing in 20 s".into() } else { err })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::local::image::KernelBoot;

    #[test]
    fn the_kvm_probe_is_keyed_by_the_kernels_content_not_its_path() {
        let tmp = tempfile::tempdir().unwrap();
        let image = |dir: &str, kernel: &[u8]| {
            let d = tmp.path().join(dir);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("vmlinuz"), kernel).unwrap();
            BootImage {
                source: d.clone(),
                disk: d.join("base.qcow2"),
                format: "qcow2".into(),
                kernel: Some(KernelBoot { vmlinuz: d.join("vmlinuz"), initrd: d.join("initrd.img"), cmdline: String::new() }),
                description: String::new(),
            }
        };
        let base = probe_key(&image("base", b"kernel 1"));
        assert_eq!(probe_key(&image("baked-elsewhere", b"kernel 1")), base, "a copy of the kernel is the same kernel");
        assert_ne!(probe_key(&image("other", b"kernel 2")), base);
        assert!(base.contains("|sha256:"), "{base}");
    }

    #[test]
    fn command_line_pins_devices_ports_and_console() {
        let f = VmFiles::in_dir(Path::new("/s/box/local"));
        let img = BootImage {
            source: "/img".into(),
            disk: "/img/base.qcow2".into(),
            format: "qcow2".into(),
            kernel: Some(KernelBoot { vmlinuz: "/img/vmlinuz".into(), initrd: "/img/initrd.img".into(), cmdline: "root=LABEL=rootfs rw".into() }),
            description: String::new(),
        };
        let m = Vm { name: "box".into(), vcpus: 2, memory_mib: 4096, accel: Accel::Tcg };
        let a = args(&m, &img, &f, &Ports { ssh: 10022, http: 18080, https: 18443 }).join(" ");
        assert!(a.contains("-accel tcg -cpu qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16 -smp 2 -m 4096"), "{a}");
        assert!(a.contains("hostfwd=tcp:127.0.0.1:10022-:22,hostfwd=tcp:127.0.0.1:18080-:80,hostfwd=tcp:127.0.0.1:18443-:443"), "{a}");
        assert!(a.contains("id=data,format=qcow2") && a.contains("drive=data,serial=sgbox-data,id=data-disk"), "{a}");
        assert!(a.contains("append=on"), "{a}");
        assert!(a.contains("-append root=LABEL=rootfs rw panic=-1"), "{a}");
        assert!(a.contains("file=/s/box/local/seed.iso,if=none,id=seed,format=raw,readonly=on"), "{a}");
        assert!(!a.contains("0.0.0.0"), "forwards bind loopback only: {a}");
    }

    #[test]
    fn dead_and_unknown_pids_are_not_alive() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX - 1));
        assert!(find_vms(Path::new("/nonexistent/overlay.qcow2")).is_empty());
    }
}
