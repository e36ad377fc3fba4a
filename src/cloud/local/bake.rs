//! `sgbox image build --cloud local --version X`: a Sourcegraph release baked into the local base
//! image, by the same bake as the clouds' (`cloud-init/bake.sh`, from `cloud::image_spec`). A
//! QEMU VM boots the base image with the bake user-data (no data disk, no forwarded port: it
//! reaches only the registry mirror, as 10.0.2.2), pulls the release, scrubs itself and powers
//! off; its console says whether the bake succeeded. The VM's disk is then flattened into a new
//! image folder of the same format as the base image's, so `up --base-image DIR` boots it, and a
//! box from it pulls nothing for its release (the boot script copies the baked images into the
//! data disk's Docker root).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::image::{BootImage, ImageManifest};
use crate::cloud::image_spec::ImageSpec;
use crate::settings::Accel;
use crate::state::write_atomic;

/// The bake VM's root disk: the base image's system, and the release's images.
const BAKE_DISK_GB: u32 = 16;

/// The folder a baked image of `spec` goes to, beside the base image's.
pub fn out_dir(base: &Path, spec: &ImageSpec) -> PathBuf {
    let parent = base.parent().unwrap_or(Path::new("."));
    parent.join(format!("{}-sourcegraph-{}-{}", base.file_name().and_then(|n| n.to_str()).unwrap_or("local"), spec.release, spec.short()))
}

/// The baked image in `out`: reused when its manifest names the same bake and base recipes.
pub fn bake(
    base: &BootImage,
    base_manifest: &ImageManifest,
    out: &Path,
    spec: &ImageSpec,
    accel: Accel,
    timeout: Duration,
    note: &dyn Fn(&str),
) -> Result<(ImageManifest, bool)> {
    let mpath = out.join("image.json");
    if let Some(m) = fs::read_to_string(&mpath).ok().and_then(|t| serde_json::from_str::<ImageManifest>(&t).ok()) {
        if m.bake_recipe.as_deref() == Some(&spec.recipe) && m.recipe_sha256 == base_manifest.recipe_sha256 && out.join(&m.disk).is_file() {
            return Ok((m, true));
        }
    }
    let kernel = base.kernel.as_ref().context("the base image boots no kernel of its own (a folder from `image build --cloud local` does)")?;
    let started = Instant::now();
    let work = out.with_file_name(format!(".{}.bake-{}", out.file_name().and_then(|n| n.to_str()).unwrap_or("image"), std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let r = bake_in(&work, base, kernel, base_manifest, out, spec, accel, timeout, started, note);
    if r.is_err() {
        // The console stays for a look; the disks go.
        let _ = fs::remove_file(work.join("overlay.qcow2"));
        let _ = fs::remove_file(work.join("base.qcow2"));
    } else {
        let _ = fs::remove_dir_all(&work);
    }
    r.map(|m| (m, false))
}

#[allow(clippy::too_many_arguments)]
fn bake_in(
    work: &Path,
    base: &BootImage,
    kernel: &super::image::KernelBoot,
    base_manifest: &ImageManifest,
    out: &Path,
    spec: &ImageSpec,
    accel: Accel,
    timeout: Duration,
    started: Instant,
    note: &dyn Fn(&str),
) -> Result<ImageManifest> {
    let overlay = work.join("overlay.qcow2");
    let disk = base.disk.display().to_string();
    super::qemu_img(&["create", "-q", "-f", "qcow2", "-b", &disk, "-F", "qcow2", &overlay.display().to_string(), &format!("{BAKE_DISK_GB}G")])?;
    let seed = work.join("seed.iso");
    super::make_seed(work, &seed, &format!("sgbox-bake-{}", spec.short()), "sgbox-bake", &spec.bake_user_data_gzip())?;
    let console = work.join("console.log");
    let mut args: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| args.extend(xs.iter().map(|s| s.to_string()));
    match accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        _ => push(&["-accel", "tcg", "-cpu", super::qemu::TCG_CPU]),
    }
    push(&["-smp", "2", "-m", "2048", "-display", "none", "-monitor", "none", "-no-reboot"]);
    push(&["-serial", &format!("file:{}", console.display())]);
    push(&["-kernel", &kernel.vmlinuz.display().to_string(), "-initrd", &kernel.initrd.display().to_string()]);
    push(&["-append", &format!("{} panic=-1", kernel.cmdline)]);
    push(&["-drive", &format!("file={},if=none,id=root,format=qcow2,discard=unmap", overlay.display()), "-device", "virtio-blk-pci,drive=root"]);
    push(&["-drive", &format!("file={},if=none,id=seed,format=raw,readonly=on", seed.display()), "-device", "virtio-blk-pci,drive=seed"]);
    // Outbound only (the registry mirror on the host, as 10.0.2.2): nothing is forwarded in.
    push(&["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile=", "-device", "virtio-rng-pci"]);
    note(&format!("baking Sourcegraph {} ({} images) in a VM from {}", spec.release, spec.images.len(), base.source.display()));
    let mut vm = Command::new(super::qemu::QEMU)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", super::qemu::QEMU))?;
    let until = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = vm.try_wait()? {
            break s;
        }
        if Instant::now() >= until {
            let _ = vm.kill();
            let _ = vm.wait();
            bail!("the bake VM did not power off within {}; its console: {}", humantime::format_duration(timeout), console.display());
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let text = fs::read_to_string(&console).unwrap_or_default();
    let tail = || text.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    match crate::cloud::image_spec::bake_outcome(&text, &spec.recipe) {
        Some(Ok(())) => {}
        Some(Err(why)) => bail!("{why}; the bake VM's console ({}):\n{}", console.display(), tail()),
        None => bail!("the bake VM stopped ({status}) without saying the bake succeeded; its console ({}):\n{}", console.display(), tail()),
    }
    note("flattening the baked disk into a standalone image");
    let flat = work.join("base.qcow2");
    super::qemu_img(&["convert", "-O", "qcow2", &overlay.display().to_string(), &flat.display().to_string()])?;
    let _ = fs::remove_file(&overlay);
    let tmp_out = work.join("out");
    fs::create_dir_all(&tmp_out)?;
    fs::rename(&flat, tmp_out.join("base.qcow2"))?;
    fs::copy(&kernel.vmlinuz, tmp_out.join("vmlinuz"))?;
    fs::copy(&kernel.initrd, tmp_out.join("initrd.img"))?;
    let m = ImageManifest {
        name: format!("{}-sourcegraph-{}", base_manifest.name, spec.release),
        disk: "base.qcow2".into(),
        kernel: "vmlinuz".into(),
        initrd: "initrd.img".into(),
        built_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        disk_bytes: fs::metadata(tmp_out.join("base.qcow2"))?.len(),
        build_seconds: started.elapsed().as_secs_f64(),
        release: Some(spec.release.clone()),
        bake_recipe: Some(spec.recipe.clone()),
        ..base_manifest.clone()
    };
    write_atomic(&tmp_out.join("image.json"), serde_json::to_string_pretty(&m)?.as_bytes(), 0o644)?;
    let _ = fs::remove_dir_all(out);
    if let Some(p) = out.parent() {
        fs::create_dir_all(p)?;
    }
    fs::rename(&tmp_out, out).with_context(|| format!("placing the baked image in {}", out.display()))?;
    Ok(m)
}
