//! The local cloud: the box is a QEMU VM on this machine. Per deployment, in
//! `<state>/<name>/local/`: a copy-on-write overlay of the base image, a separate qcow2 data disk
//! (kept by `down` unless asked), a NoCloud seed ISO with the rendered user-data, the serial
//! console log, a pidfile and a QMP socket; `vm.json` records the instance id, ports and
//! accelerator before QEMU starts.
//!
//! Networking is QEMU's user mode: SSH, HTTP and HTTPS are forwarded from 127.0.0.1 only, and the
//! guest reaches the host as 10.0.2.2 (a local registry mirror, for instance).

pub mod bake;
pub mod image;
pub mod qemu;

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use self::qemu::{Ports, VmFiles};
use super::{failed, io_err, BaseImage, CloudError, Endpoint, InstanceSpec, InstanceState, KeptDisk, Machine, Resource, Result, Spec};
use crate::error::UserError;
use crate::release::version::Version;
use crate::settings::Accel;
use crate::state::write_atomic;

/// Root disk size of the overlay; cloud-init grows the filesystem to it on first boot.
const ROOT_DISK_GB: u32 = 16;

#[derive(Clone)]
pub struct Local {
    spec: Spec,
    dir: PathBuf,
    cache: PathBuf,
    files: VmFiles,
}

/// `vm.json`: written before QEMU starts, so a crash mid-start leaves a record to resume from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmRecord {
    pub instance_id: String,
    pub base_image: String,
    pub accel: String,
    pub ssh_port: u16,
    pub http_port: u16,
    pub https_port: u16,
    pub pid: Option<u32>,
}

impl Local {
    pub fn new(spec: Spec, deployment_dir: PathBuf, cache: PathBuf) -> Local {
        let dir = deployment_dir.join("local");
        let files = VmFiles::in_dir(&dir);
        Local { spec, dir, cache, files }
    }

    /// Run blocking work (qemu-img, the KVM probe, QEMU's start, a download) on the blocking
    /// pool, so the runtime's two workers keep serving timers and SSH meanwhile.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(Local) -> T + Send + 'static) -> T {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(me)).await.expect("blocking task")
    }

    /// `qemu-img snapshot OP NAME` on the data disk (`-c` takes one, `-a` applies one), off the
    /// async workers.
    async fn data_snapshot(&self, op: &'static str, name: &str) -> Result<()> {
        let name = name.to_string();
        self.blocking(move |l| qemu_img(&["snapshot", op, &name, &l.files.data.display().to_string()])).await
    }

    /// Take or delete the data disk's internal snapshot `name`: through QEMU (QMP `command`)
    /// while the VM holds the disk, else with `qemu-img snapshot img_op`.
    async fn internal_snapshot(&self, command: &'static str, img_op: &'static str, name: &str, what: &'static str) -> Result<()> {
        if self.running_pid().is_none() {
            return self.data_snapshot(img_op, name).await;
        }
        let qmp = self.files.qmp.clone();
        let args = serde_json::json!({ "device": qemu::DATA_NODE, "name": name });
        tokio::task::spawn_blocking(move || qemu::qmp(&qmp, command, Some(args))).await.expect("qmp task").map_err(|m| failed(what, m))?;
        Ok(())
    }

    fn record(&self) -> Option<VmRecord> {
        fs::read_to_string(self.dir.join("vm.json")).ok().and_then(|t| serde_json::from_str(&t).ok())
    }

    fn save(&self, r: &VmRecord) -> Result<()> {
        let text = serde_json::to_string_pretty(r).expect("serializable");
        write_atomic(&self.dir.join("vm.json"), text.as_bytes(), 0o600).map_err(|e| failed("recording the VM", format!("{e:#}")))
    }

    /// Our running QEMU, found by its overlay path in /proc.
    fn running_pid(&self) -> Option<u32> {
        qemu::find_vms(&self.files.overlay).into_iter().find(|p| qemu::alive(*p))
    }

    fn pick_ports(&self, previous: Option<&VmRecord>) -> Result<Ports> {
        let l = &self.spec.local;
        let pick = |wanted: Option<u16>, prev: Option<u16>, taken: &[u16]| -> Result<u16> {
            if let Some(p) = wanted {
                return Ok(p);
            }
            // Keep the previous port when it is free, so the URL survives a restart.
            if let Some(p) = prev.filter(|p| port_free(*p) && !taken.contains(p)) {
                return Ok(p);
            }
            loop {
                let p = TcpListener::bind(("127.0.0.1", 0)).and_then(|s| s.local_addr()).map_err(io_err("picking a free port"))?.port();
                if !taken.contains(&p) {
                    return Ok(p);
                }
            }
        };
        let ssh = pick(l.ssh_port, previous.map(|r| r.ssh_port), &[])?;
        let http = pick(l.http_port, previous.map(|r| r.http_port), &[ssh])?;
        let https = pick(l.https_port, previous.map(|r| r.https_port), &[ssh, http])?;
        Ok(Ports { ssh, http, https })
    }

    /// Start the VM (or find it running): overlay and data disk made once, the seed rewritten when
    /// `user_data` is given (a restart keeps the one the box was created with).
    fn start(&self, base: &BaseImage, user_data: Option<&str>) -> Result<String> {
        let previous = self.record();
        if let (Some(pid), Some(r)) = (self.running_pid(), &previous) {
            let mut r = r.clone();
            r.pid = Some(pid);
            self.save(&r)?;
            return Ok(r.instance_id);
        }
        let img = image::open(Path::new(&base.id))?;
        fs::create_dir_all(&self.dir).map_err(io_err("creating the VM folder"))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(io_err("restricting the VM folder"))?;

        let instance_id = previous.as_ref().map(|r| r.instance_id.clone()).unwrap_or_else(|| format!("sgbox-{}-{}", self.spec.name, random_suffix()));
        if !self.files.overlay.exists() {
            let base = fs::canonicalize(&img.disk).map_err(io_err("resolving the base image"))?;
            let tmp = self.dir.join(".overlay.qcow2");
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                &img.format,
                "-b",
                &base.display().to_string(),
                &tmp.display().to_string(),
                &format!("{ROOT_DISK_GB}G"),
            ])?;
            fs::rename(&tmp, &self.files.overlay).map_err(io_err("placing the overlay"))?;
        }
        if !self.files.data.exists() {
            let tmp = self.dir.join(".data.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", &tmp.display().to_string(), &format!("{}G", self.spec.data_disk_gb)])?;
            fs::rename(&tmp, &self.files.data).map_err(io_err("placing the data disk"))?;
            self.write_data_release(self.spec.release)?;
        }
        if let Some(user_data) = user_data {
            self.write_seed(&instance_id, user_data)?;
        } else if !self.files.seed.exists() {
            return Err(failed("starting the VM", "its seed ISO is missing; run `sgbox up` again"));
        }

        let (accel, note) = qemu::choose_accel(self.spec.local.accel, &img, &self.cache)
            .map_err(|m| CloudError::Input(UserError::field("accel", m).hint("use accel = auto or tcg")))?;
        if let Some(n) = note {
            crate::output::note(format!("note: {n}"));
        }
        let machine = &self.spec.machine;
        let m = qemu::Vm {
            name: self.spec.name.clone(),
            vcpus: machine.vcpus.unwrap_or(2),
            memory_mib: u64::from(machine.memory_gib.unwrap_or(4)) * 1024,
            accel,
        };
        let auto_ports = self.spec.local.ssh_port.is_none() || self.spec.local.http_port.is_none() || self.spec.local.https_port.is_none();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let ports = self.pick_ports(previous.as_ref())?;
            let mut rec = VmRecord {
                instance_id: instance_id.clone(),
                base_image: img.disk.display().to_string(),
                accel: accel.to_string(),
                ssh_port: ports.ssh,
                http_port: ports.http,
                https_port: ports.https,
                pid: None,
            };
            self.save(&rec)?;
            let _ = fs::remove_file(&self.files.pidfile);
            match qemu::start(&qemu::args(&m, &img, &self.files, &ports)) {
                Ok(pid) => {
                    rec.pid = Some(pid);
                    self.save(&rec)?;
                    return Ok(instance_id);
                }
                Err(qemu::StartError::PortTaken(msg)) if auto_ports && attempts < 4 => {
                    crate::output::note(format!("note: a forwarded port was taken meanwhile ({msg}); picking others"));
                }
                Err(qemu::StartError::PortTaken(msg)) => {
                    return Err(UserError::field("ssh-port", format!("QEMU could not forward a port: {msg}"))
                        .hint("pick other ports, or omit them to use free ones")
                        .into())
                }
                Err(qemu::StartError::Failed(msg)) => return Err(failed("starting QEMU", msg)),
            }
        }
    }

    /// Beside the data disk: the release its databases are at (a cloud would tag the volume).
    fn data_release_path(&self) -> PathBuf {
        self.dir.join("data-release")
    }

    fn write_data_release(&self, release: Version) -> Result<()> {
        write_atomic(&self.data_release_path(), format!("{release}\n").as_bytes(), 0o600)
            .map_err(|e| failed("recording the data disk's release", format!("{e:#}")))
    }

    fn write_seed(&self, instance_id: &str, user_data: &str) -> Result<()> {
        make_seed(&self.dir, &self.files.seed, instance_id, &self.spec.name, user_data.as_bytes())
    }
}

/// A NoCloud seed ISO at `out` (mode 0600: a box's user-data names its secrets' places), made in
/// `work`.
pub fn make_seed(work: &Path, out: &Path, instance_id: &str, hostname: &str, user_data: &[u8]) -> Result<()> {
    let tmp = work.join(".seed");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err("creating the seed folder"))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o700)).map_err(io_err("restricting the seed folder"))?;
    let meta = format!("instance-id: {instance_id}\nlocal-hostname: {hostname}\n");
    write_atomic(&tmp.join("user-data"), user_data, 0o600).map_err(|e| failed("writing the seed", format!("{e:#}")))?;
    write_atomic(&tmp.join("meta-data"), meta.as_bytes(), 0o600).map_err(|e| failed("writing the seed", format!("{e:#}")))?;
    let tool = iso_tool().ok_or_else(|| failed("making the seed", "no genisoimage, mkisofs or xorriso"))?;
    let mut cmd = Command::new(&tool);
    if tool.ends_with("xorriso") {
        cmd.arg("-as").arg("mkisofs");
    }
    let out_tmp = work.join(".seed.iso");
    let o = cmd
        .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
        .arg(&out_tmp)
        .arg(tmp.join("user-data"))
        .arg(tmp.join("meta-data"))
        .output()
        .map_err(io_err("running the ISO tool"))?;
    let _ = fs::remove_dir_all(&tmp);
    if !o.status.success() {
        return Err(failed("making the seed ISO", String::from_utf8_lossy(&o.stderr).trim().to_string()));
    }
    fs::set_permissions(&out_tmp, fs::Permissions::from_mode(0o600)).map_err(io_err("restricting the seed"))?;
    fs::rename(&out_tmp, out).map_err(io_err("placing the seed"))?;
    Ok(())
}

fn port_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok()
}

fn iso_tool() -> Option<PathBuf> {
    ["genisoimage", "mkisofs", "xorriso"].iter().find_map(|t| image::which(t))
}

fn qemu_img(args: &[&str]) -> Result<()> {
    let out = Command::new("qemu-img").args(args).output().map_err(io_err("running qemu-img"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(format!("qemu-img {}", args.first().unwrap_or(&"")), String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

fn random_suffix() -> String {
    use rand::Rng;
    format!("{:08x}", rand::rng().random::<u32>())
}

#[async_trait]
impl Machine for Local {
    async fn kept_data_disk(&self) -> Result<Option<KeptDisk>> {
        if self.files.overlay.exists() || !self.files.data.exists() {
            return Ok(None);
        }
        let release = fs::read_to_string(self.data_release_path()).ok().and_then(|r| r.trim().parse().ok());
        Ok(Some(KeptDisk { id: self.files.data.display().to_string(), release }))
    }

    async fn record_data_release(&self, release: Version) -> Result<()> {
        if !self.files.data.exists() {
            return Ok(());
        }
        self.write_data_release(release)
    }

    async fn preflight(&self) -> Result<()> {
        if image::which(qemu::QEMU).is_none() || image::which("qemu-img").is_none() {
            return Err(UserError::field("cloud", "QEMU is not installed (the local cloud runs the box as a QEMU VM)")
                .hint("install it: apt-get install qemu-system-x86 qemu-utils (on Debian 12 with backports' qemu-utils: apt-get install -t bookworm-backports qemu-system-x86)")
                .into());
        }
        if iso_tool().is_none() {
            return Err(UserError::field("cloud", "no tool to write the cloud-init seed ISO")
                .hint("install one: apt-get install genisoimage (or xorriso)")
                .into());
        }
        if let Some(p) = &self.spec.local.base_image {
            image::open(p)?;
        }
        if self.spec.local.accel == Accel::Kvm && !qemu::kvm_device_usable() {
            return Err(UserError::field("accel", "kvm was asked for, but /dev/kvm is missing or not accessible")
                .hint("use accel = auto or tcg")
                .into());
        }
        // Ports the user chose must be free, unless our own VM already holds them.
        if self.running_pid().is_none() {
            let l = &self.spec.local;
            for (key, port) in [("ssh-port", l.ssh_port), ("http-port", l.http_port), ("https-port", l.https_port)] {
                if let Some(p) = port {
                    if !port_free(p) {
                        return Err(UserError::field(key, format!("127.0.0.1:{p} is already in use"))
                            .hint(format!("pick another port, or omit {key} to use a free one"))
                            .into());
                    }
                }
            }
        }
        Ok(())
    }

    async fn ensure_network(&self) -> Result<()> {
        // User-mode networking: nothing to create; the forwards are part of the VM.
        Ok(())
    }

    async fn ensure_key(&self, _public_key: &str) -> Result<()> {
        // The key reaches the box through the seed's user-data.
        Ok(())
    }

    async fn find_base_image(&self) -> Result<BaseImage> {
        let found = self
            .blocking(|l| match &l.spec.local.base_image {
                Some(p) => image::open(p).map_err(anyhow::Error::from),
                None => image::default_image(&l.cache, &|m| crate::output::note(m)),
            })
            .await;
        let img = found.map_err(|e| match e.downcast::<UserError>() {
            Ok(u) => CloudError::Input(u),
            Err(e) => failed("finding the base image", format!("{e:#}")),
        })?;
        // The id is what `open` takes again in create_instance: the folder or the disk file.
        Ok(BaseImage { id: img.source.display().to_string(), description: img.description })
    }

    async fn create_instance(&self, base: &BaseImage, spec: &InstanceSpec<'_>) -> Result<String> {
        let (base, user_data) = (base.clone(), spec.user_data.to_string());
        self.blocking(move |l| l.start(&base, Some(&user_data))).await
    }

    async fn restore_data_disk(&self, snapshot: &str, timeout: Duration) -> Result<()> {
        // An internal qcow2 snapshot can only be applied while nothing has the disk open.
        let pids = qemu::find_vms(&self.files.overlay);
        let qmp = self.files.qmp.clone();
        let grace = timeout.min(Duration::from_secs(120));
        let stopped = tokio::task::spawn_blocking(move || pids.into_iter().all(|pid| qemu::stop(pid, &qmp, grace))).await.expect("stop task");
        if !stopped || self.running_pid().is_some() {
            return Err(failed("stopping the VM to restore its data disk", "QEMU did not stop"));
        }
        self.data_snapshot("-a", snapshot).await?;
        let base = self.find_base_image().await?;
        self.blocking(move |l| l.start(&base, None)).await?;
        self.wait_running(timeout).await.map(|_| ())
    }

    fn can_swap_data_disk(&self) -> bool {
        true
    }

    async fn swap_data_disk(&self, snapshot: &str, timeout: Duration) -> Result<()> {
        // Hot-unplug the virtio disk (the guest acknowledges the ACPI eject, and QEMU then drops
        // the drive and its lock on the file), apply the internal snapshot, plug it back with the
        // same serial: the guest sees its data disk again, without a reboot under emulation.
        if self.running_pid().is_none() {
            return Err(failed("swapping the data disk", "the VM is not running"));
        }
        let qmp = self.files.qmp.clone();
        let data = self.files.data.clone();
        let until = Instant::now() + timeout.min(Duration::from_secs(120));
        let unplug = tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
            qemu::qmp(&qmp, "device_del", Some(serde_json::json!({ "id": qemu::DATA_DEVICE })))?;
            loop {
                let blocks = qemu::qmp(&qmp, "query-block", None)?;
                // Attached: the boot's `-drive` backend (named "data") or the device of an earlier
                // swap (its backend is anonymous; its qdev path names the device).
                let attached = blocks.as_array().is_some_and(|a| {
                    a.iter().any(|b| b["device"] == qemu::DATA_NODE || b["qdev"].as_str().is_some_and(|q| q.contains(qemu::DATA_DEVICE)))
                });
                if !attached {
                    // A `-drive` goes with its device; a node from an earlier swap stays until
                    // deleted, holding the file open.
                    let _ = qemu::qmp(&qmp, "blockdev-del", Some(serde_json::json!({ "node-name": qemu::DATA_NODE })));
                    return Ok(());
                }
                if Instant::now() > until {
                    return Err("the guest did not release the data disk (ACPI eject)".into());
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        unplug.await.expect("qmp task").map_err(|m| failed("unplugging the data disk", m))?;
        self.data_snapshot("-a", snapshot).await?;
        let qmp = self.files.qmp.clone();
        let plug = tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
            let node = serde_json::json!({
                "driver": "qcow2", "node-name": qemu::DATA_NODE, "discard": "unmap",
                "file": { "driver": "file", "filename": data.display().to_string() },
            });
            qemu::qmp(&qmp, "blockdev-add", Some(node))?;
            let dev = serde_json::json!({ "driver": "virtio-blk-pci", "drive": qemu::DATA_NODE, "serial": crate::render::DATA_DISK_SERIAL, "id": qemu::DATA_DEVICE });
            qemu::qmp(&qmp, "device_add", Some(dev)).map(|_| ())
        });
        plug.await.expect("qmp task").map_err(|m| failed("plugging the data disk back", m))
    }

    async fn wait_running(&self, timeout: Duration) -> Result<Endpoint> {
        let start = Instant::now();
        loop {
            if let Some(pid) = self.running_pid() {
                let qmp = self.files.qmp.clone();
                let status = tokio::task::spawn_blocking(move || qemu::qmp(&qmp, "query-status", None)).await.expect("qmp task");
                if let Ok(s) = status {
                    match s["status"].as_str() {
                        Some("running") => return self.endpoint().await?.ok_or_else(|| failed("reading the VM record", "vm.json is missing")),
                        Some(st @ ("internal-error" | "guest-panicked" | "shutdown")) => {
                            return Err(failed("starting the VM", format!("QEMU (pid {pid}) reports `{st}`; see {}", self.files.console.display())))
                        }
                        _ => {}
                    }
                }
            } else if start.elapsed() > Duration::from_secs(5) {
                return Err(failed("starting the VM", format!("QEMU is not running; see {}", self.files.console.display())));
            }
            if start.elapsed() > timeout {
                return Err(CloudError::Timeout { what: "the VM running".into(), waited: timeout });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn state(&self) -> Result<InstanceState> {
        Ok(if self.running_pid().is_some() {
            InstanceState::Running
        } else if self.files.overlay.exists() {
            InstanceState::Stopped
        } else {
            InstanceState::Absent
        })
    }

    async fn endpoint(&self) -> Result<Option<Endpoint>> {
        Ok(self.record().filter(|_| self.running_pid().is_some()).map(|r| Endpoint {
            host: "127.0.0.1".into(),
            ssh_port: r.ssh_port,
            http_port: r.http_port,
            https_port: r.https_port,
        }))
    }

    fn console_hint(&self) -> String {
        format!("the box's console log: {}", self.files.console.display())
    }

    async fn console_output(&self) -> Result<String> {
        match fs::read(&self.files.console) {
            Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(io_err("reading the console log")(e)),
        }
    }

    async fn snapshot_data_disk(&self, label: &str) -> Result<String> {
        let name = format!("{label}-{}", random_suffix());
        self.internal_snapshot("blockdev-snapshot-internal-sync", "-c", &name, "snapshotting the data disk").await?;
        Ok(name)
    }

    async fn snapshots(&self) -> Result<Vec<crate::cloud::Snapshot>> {
        if !self.files.data.exists() {
            return Ok(vec![]);
        }
        // Internal qcow2 snapshots; -U reads the image while QEMU holds it.
        let data = self.files.data.display().to_string();
        let out = self
            .blocking(move |_| Command::new("qemu-img").args(["info", "-U", "--output=json", &data]).output())
            .await
            .map_err(io_err("running qemu-img info"))?;
        if !out.status.success() {
            return Err(failed("qemu-img info", String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| failed("qemu-img info", e.to_string()))?;
        let mut all: Vec<crate::cloud::Snapshot> = v["snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let name = s["name"].as_str().unwrap_or_default().to_string();
                let at = std::time::UNIX_EPOCH + Duration::from_secs(s["date-sec"].as_u64().unwrap_or(0));
                crate::cloud::Snapshot {
                    label: name.rsplit_once('-').map_or(name.as_str(), |(l, _)| l).to_string(),
                    id: name,
                    created: humantime::format_rfc3339_seconds(at).to_string(),
                    size_gib: None,
                }
            })
            .collect();
        all.sort_by(|a, b| a.created.cmp(&b.created));
        Ok(all)
    }

    async fn delete_snapshot(&self, id: &str) -> Result<()> {
        if !self.snapshots().await?.iter().any(|s| s.id == id) {
            return Err(UserError::field("snapshot", format!("{id} is not a snapshot of this box's data disk"))
                .hint("list them with `sgbox snapshots`")
                .into());
        }
        self.internal_snapshot("blockdev-snapshot-delete-internal-sync", "-d", id, "deleting a data snapshot").await
    }

    async fn resources(&self) -> Result<Vec<Resource>> {
        let mut out = Vec::new();
        for pid in qemu::find_vms(&self.files.overlay) {
            out.push(Resource { kind: "qemu process".into(), id: pid.to_string(), kept_by_default: false });
        }
        for (kind, path, kept) in
            [("overlay disk", &self.files.overlay, false), ("seed ISO", &self.files.seed, false), ("data disk", &self.files.data, true)]
        {
            if path.exists() {
                out.push(Resource { kind: kind.into(), id: path.display().to_string(), kept_by_default: kept });
            }
        }
        Ok(out)
    }

    async fn destroy(&self, delete_data: bool, timeout: Duration) -> Result<Vec<Resource>> {
        let pids = qemu::find_vms(&self.files.overlay);
        let qmp = self.files.qmp.clone();
        let grace = timeout.min(Duration::from_secs(90));
        tokio::task::spawn_blocking(move || {
            for pid in pids {
                qemu::stop(pid, &qmp, grace);
            }
        })
        .await
        .expect("stop task");
        if qemu::find_vms(&self.files.overlay).iter().all(|p| !qemu::alive(*p)) {
            let mut doomed: Vec<&Path> = vec![&self.files.overlay, &self.files.seed, &self.files.pidfile, &self.files.qmp, &self.files.console];
            let release = self.data_release_path();
            if delete_data {
                doomed.push(&self.files.data);
                doomed.push(&release);
            }
            for p in doomed {
                match fs::remove_file(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(format!("removing {}", p.display()))(e)),
                }
            }
            let _ = fs::remove_file(self.dir.join("vm.json"));
            if delete_data {
                let _ = fs::remove_dir(&self.dir);
            }
        }
        let mut left = self.resources().await?;
        left.retain(|r| delete_data || !r.kept_by_default);
        Ok(left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Layer;

    fn local(dir: &Path) -> Local {
        let layer = Layer::from_flags([("cloud", Some("local".to_string())), ("name", Some("snap".to_string()))]);
        let s = crate::settings::Settings::resolve(&layer).unwrap();
        Local::new(Spec::of(&s), dir.join("snap"), dir.join("cache"))
    }

    #[tokio::test]
    async fn a_stopped_box_snapshots_its_data_disk_and_lists_what_it_owns() {
        let tmp = tempfile::tempdir().unwrap();
        let l = local(tmp.path());
        assert_eq!(l.state().await.unwrap(), InstanceState::Absent);
        assert!(l.resources().await.unwrap().is_empty());
        fs::create_dir_all(&l.dir).unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", &l.files.data.display().to_string(), "1G"]).expect("qemu-img (qemu-utils) is installed");
        let id = l.snapshot_data_disk("pre-upgrade").await.unwrap();
        assert!(id.starts_with("pre-upgrade-"), "{id}");
        let out = Command::new("qemu-img").args(["snapshot", "-l"]).arg(&l.files.data).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(&id), "snapshot listed");
        // Listed, oldest first; the retention rule keeps the newest; a deleted one is gone.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let id2 = l.snapshot_data_disk("sgbox-pre-7.5.4453").await.unwrap();
        let all = l.snapshots().await.unwrap();
        assert_eq!(all.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec![id.as_str(), id2.as_str()]);
        assert_eq!(all[1].label, "sgbox-pre-7.5.4453");
        let doomed = crate::cloud::beyond_retention(&all, 1);
        assert_eq!(doomed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec![id.as_str()]);
        l.delete_snapshot(&id).await.unwrap();
        assert_eq!(l.snapshots().await.unwrap().len(), 1);
        assert!(l.delete_snapshot("not-there").await.is_err());
        let r = l.resources().await.unwrap();
        assert_eq!(r.len(), 1);
        assert!(r[0].kept_by_default, "the data disk is kept by default");
        // Down without --delete-data keeps it; with it, the disk goes.
        assert!(l.destroy(false, Duration::from_secs(5)).await.unwrap().is_empty());
        assert!(l.files.data.exists());
        assert!(l.destroy(true, Duration::from_secs(5)).await.unwrap().is_empty());
        assert!(!l.files.data.exists());
    }

    #[test]
    fn qemu_img_runs_off_the_async_workers() {
        // A qemu-img that takes 1.5 s: while it runs, a timer task on the same single-threaded
        // runtime must keep ticking (it stalls if the work blocks the runtime's thread).
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let real = image::which("qemu-img").expect("qemu-img (qemu-utils) is installed");
        let bin = tmp.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        let shim = bin.join("qemu-img");
        fs::write(&shim, format!("#!/bin/sh\nsleep 1.5\nexec {} \"$@\"\n", real.display())).unwrap();
        fs::set_permissions(&shim, fs::Permissions::from_mode(0o755)).unwrap();
        let l = local(tmp.path());
        fs::create_dir_all(&l.dir).unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", &l.files.data.display().to_string(), "1G"]).unwrap();
        let old = std::env::var_os("PATH").unwrap_or_default();
        // Other tests that run qemu-img meanwhile only get slower: the shim runs the real one.
        std::env::set_var("PATH", std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&old))).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = ticks.clone();
        rt.block_on(async {
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
            let start = std::time::Instant::now();
            l.snapshot_data_disk("pre").await.unwrap();
            assert!(start.elapsed() >= Duration::from_millis(1400), "the shim ran");
            ticker.abort();
        });
        std::env::set_var("PATH", old);
        let n = ticks.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n >= 8, "the runtime's thread was blocked: {n} ticks of 100 ms in 1.5 s");
    }
}
