//! Base images for the local cloud: the folder `sgbox image build --cloud local` writes (a Debian
//! 13 root filesystem made offline from Debian packages with debootstrap, plus its kernel and
//! initrd for direct boot), or a plain bootable disk image such as Debian's genericcloud qcow2,
//! downloaded once into the cache with its SHA512 checked.
//!
//! The built image carries Docker and Compose already, so a box boots without reaching a package
//! mirror; genericcloud boxes install them from Debian at first boot (needs internet).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};

use crate::cloud::hex;
use crate::error::UserError;
use crate::state::write_atomic;

/// Debian release the box runs: the same as the default AWS and GCP images.
pub const SUITE: &str = "trixie";
pub const IMAGE_DIR_NAME: &str = "local-debian-13";
const GENERICCLOUD_URL: &str = "https://cloud.debian.org/images/cloud/trixie/latest";
const GENERICCLOUD_FILE: &str = "debian-13-genericcloud-amd64.qcow2";

/// debootstrap does not resolve virtual packages, and Debian 13 split the Docker CLI out of
/// docker.io: every package is listed by hand (python3-cffi-backend for cloud-init's
/// cryptography, apparmor for Docker's default profile, locales for cloud-init's locale module).
const PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "dbus",
    "iproute2",
    "openssh-server",
    "cloud-init",
    "docker.io",
    "docker-cli",
    "docker-compose",
    // The local box's container runtime (see render::uses_crun).
    "crun",
    "apparmor",
    "sudo",
    "procps",
    "e2fsprogs",
    "util-linux",
    "ca-certificates",
    "curl",
    "python3-cffi-backend",
    "locales",
];

/// Written into the image: NoCloud first (the local seed), ed25519/ecdsa host keys only (RSA
/// generation is slow under TCG), no GRUB handling (the box boots its kernel directly).
const CLOUD_CFG: &str = "datasource_list: [ NoCloud, None ]\nssh_genkeytypes: [ ed25519, ecdsa ]\ngrub_dpkg: {enabled: false}\n";
const NETWORK: &str = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n";
/// By label: the data disk's virtio device may enumerate first and take vda.
const FSTAB: &str = "LABEL=rootfs / ext4 defaults,errors=remount-ro 0 1\n";
pub const KERNEL_CMDLINE: &str = "root=LABEL=rootfs rw console=ttyS0 net.ifnames=0";

/// `image.json` in a built image folder.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageManifest {
    pub format: u32,
    pub name: String,
    pub suite: String,
    pub disk: String,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub recipe_sha256: String,
    pub built_at: String,
    pub disk_bytes: u64,
    pub build_seconds: f64,
    /// A baked image (`image build --cloud local --version`): the Sourcegraph release inside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// The bake's recipe (`cloud::image_spec`); with the base image's recipe, what makes two
    /// baked images the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_recipe: Option<String>,
}

/// What QEMU boots.
#[derive(Clone, Debug)]
pub struct BootImage {
    /// What `open` was given: the image folder or the disk file.
    pub source: PathBuf,
    pub disk: PathBuf,
    pub format: String,
    /// Direct kernel boot (built images); `None` boots the disk's own bootloader.
    pub kernel: Option<KernelBoot>,
    pub description: String,
}

#[derive(Clone, Debug)]
pub struct KernelBoot {
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

/// A base image given by path: an image folder (with image.json) or a disk image file.
pub fn open(path: &Path) -> Result<BootImage, UserError> {
    let bad = |m: String| {
        UserError::field("base-image", m).hint("give a Debian 13 cloud image (qcow2) or a folder written by `sgbox image build --cloud local`")
    };
    if path.is_dir() {
        let mpath = path.join("image.json");
        let text = fs::read_to_string(&mpath).map_err(|_| bad(format!("{} is a folder without image.json", path.display())))?;
        let m: ImageManifest = serde_json::from_str(&text).map_err(|e| bad(format!("{} is not an sgbox image manifest: {e}", mpath.display())))?;
        let disk = path.join(&m.disk);
        let (vmlinuz, initrd) = (path.join(&m.kernel), path.join(&m.initrd));
        for f in [&disk, &vmlinuz, &initrd] {
            if !f.is_file() {
                return Err(bad(format!("{} lists {}, which is missing", mpath.display(), f.display())));
            }
        }
        return Ok(BootImage {
            source: path.to_path_buf(),
            disk,
            format: "qcow2".into(),
            kernel: Some(KernelBoot { vmlinuz, initrd, cmdline: m.cmdline.clone() }),
            description: format!("{} (built {} with debootstrap)", path.display(), m.built_at),
        });
    }
    let format = disk_format(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    Ok(BootImage { source: path.to_path_buf(), disk: path.to_path_buf(), format, kernel: None, description: path.display().to_string() })
}

/// qcow2 or raw, read from the file's header (QEMU must be told; guessing raw is unsafe).
fn disk_format(path: &Path) -> Result<String, String> {
    let mut f = fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| format!("cannot read: {e}"))?;
    if n == 4 && &magic == b"QFI\xfb" {
        return Ok("qcow2".into());
    }
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len >= 512 * 1024 * 1024 && len % 512 == 0 {
        return Ok("raw".into());
    }
    Err("not a qcow2 or raw disk image".into())
}

/// The default base image: the built one if present, else Debian's genericcloud image from the
/// cache, downloading it first if needed.
pub fn default_image(cache: &Path, note: &dyn Fn(&str)) -> Result<BootImage> {
    let built = cache.join("images").join(IMAGE_DIR_NAME);
    if built.join("image.json").is_file() {
        return Ok(open(&built)?);
    }
    let file = cache.join("images").join(GENERICCLOUD_FILE);
    if !file.is_file() {
        let base = std::env::var("SGBOX_DEBIAN_IMAGE_URL").unwrap_or_else(|_| GENERICCLOUD_URL.to_string());
        note(&format!("downloading Debian 13 genericcloud from {base} (needs internet; offline, run `sgbox image build --cloud local` instead)"));
        download_checked(&base, GENERICCLOUD_FILE, &file).with_context(|| {
            format!("no local base image: {} has no built image and the download failed; run `sgbox image build --cloud local` (offline, from Debian packages) or pass --base-image", cache.display())
        })?;
    }
    Ok(open(&file)?)
}

/// Download `base/name` to `dest`, accepting it only if its SHA512 matches `base/SHA512SUMS`.
fn download_checked(base: &str, name: &str, dest: &Path) -> Result<()> {
    let agent = ureq::Agent::new_with_defaults();
    let sums =
        agent.get(format!("{base}/SHA512SUMS")).call().context("fetching SHA512SUMS")?.body_mut().read_to_string().context("reading SHA512SUMS")?;
    let want = sums
        .lines()
        .find_map(|l| {
            let (sum, file) = l.split_once(char::is_whitespace)?;
            (file.trim().trim_start_matches('*') == name).then(|| sum.to_ascii_lowercase())
        })
        .with_context(|| format!("SHA512SUMS does not list {name}"))?;
    fs::create_dir_all(dest.parent().expect("cache path")).with_context(|| format!("creating {}", dest.display()))?;
    let part = dest.with_extension("part");
    let mut resp = agent.get(format!("{base}/{name}")).call().with_context(|| format!("downloading {name}"))?;
    let mut reader = resp.body_mut().with_config().limit(8 << 30).reader();
    let mut out = fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
    let mut hasher = Sha512::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).context("downloading")?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    out.sync_all()?;
    let got = hex(&hasher.finalize());
    if got != want {
        let _ = fs::remove_file(&part);
        bail!("{name}: SHA512 {got} does not match SHA512SUMS ({want}); the download was discarded");
    }
    fs::rename(&part, dest)?;
    Ok(())
}

pub struct BuildOptions {
    pub out: PathBuf,
    pub mirror: String,
    pub force: bool,
}

pub enum Built {
    Fresh(ImageManifest),
    /// The folder already holds an image of the same recipe.
    Cached(ImageManifest),
}

/// The package mirror apt on this machine uses, so the build works where only it is reachable.
/// `sgbox image build --cloud local`.
pub struct LocalImageBuilder(pub BuildOptions);

impl crate::cloud::ImageBuilder for LocalImageBuilder {
    fn build(&self, note: &dyn Fn(&str)) -> Result<Built> {
        build(&self.0, note)
    }
}

pub fn host_mirror() -> String {
    let from_sources = fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("URIs:").and_then(|u| u.split_whitespace().next()).map(str::to_string)));
    from_sources.unwrap_or_else(|| "http://deb.debian.org/debian".to_string())
}

/// What the image holds of a machine's identity (in the recipe: an image built before this
/// changed is built again).
const IDENTITY: &str =
    "no host keys (cloud-init makes them; sshd-keygen.service masked); /etc/machine-id empty; /var/lib/dbus/machine-id linked to it";

/// What the image does with AppArmor's naming-only profiles (in the recipe, as IDENTITY is).
const APPARMOR: &str = "profiles with flags=(unconfined) disabled by links in /etc/apparmor.d/disable";

fn recipe_sha256() -> String {
    let mut h = Sha256::new();
    for part in [SUITE, &PACKAGES.join(","), CLOUD_CFG, NETWORK, FSTAB, KERNEL_CMDLINE, IDENTITY, APPARMOR] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex(&h.finalize())
}

/// Disables, the documented way (a link in `disable/`), every AppArmor profile of `dir` that
/// confines nothing: Debian 13's `apparmor` ships 76 such profiles (`flags=(unconfined)`, which
/// "only exist to give the application a name instead of the label unconfined") for desktop
/// programs, crun and runc among them, so that Ubuntu's user-namespace restriction lets them
/// through. Debian's kernel has no such restriction, so they change nothing on a box, but
/// `apparmor.service` compiles or loads each one at every boot: 16–18 s of an emulated boot.
/// The profiles that do confine are kept, and Docker loads its own (`docker-default`).
fn disable_unconfined_profiles(dir: &Path) -> Result<usize> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(0) };
    let disable = dir.join("disable");
    let mut n = 0;
    for e in entries {
        let e = e?;
        if !e.file_type()?.is_file() {
            continue;
        }
        let text = fs::read_to_string(e.path()).unwrap_or_default();
        // Every profile of the file unconfined (a file with a confining one as well is kept).
        let heads: Vec<&str> = text.lines().map(str::trim_start).filter(|l| l.starts_with("profile ")).collect();
        if heads.is_empty() || !heads.iter().all(|l| l.contains("flags=(unconfined)")) {
            continue;
        }
        fs::create_dir_all(&disable)?;
        let link = disable.join(e.file_name());
        if fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("/etc/apparmor.d").join(e.file_name()), &link)
                .with_context(|| format!("disabling AppArmor profile {}", e.path().display()))?;
        }
        n += 1;
    }
    Ok(n)
}

pub fn check_build_tools() -> Result<(), UserError> {
    let missing: Vec<&str> = ["debootstrap", "mkfs.ext4", "qemu-img", "chroot"].into_iter().filter(|t| which(t).is_none()).collect();
    if !missing.is_empty() {
        return Err(UserError::field("image build", format!("missing tools: {}", missing.join(", ")))
            .hint("apt-get install debootstrap e2fsprogs qemu-utils"));
    }
    if !rustix::process::geteuid().is_root() {
        return Err(UserError::field("image build", "debootstrap needs root").hint("run `sudo sgbox image build --cloud local`"));
    }
    Ok(())
}

/// A program on PATH, or in the sbin folders a non-root PATH often lacks (mkfs.ext4, debootstrap).
pub fn which(tool: &str) -> Option<PathBuf> {
    which::which(tool).ok().or_else(|| which::which_in(tool, Some("/usr/sbin:/sbin"), "/").ok())
}

fn run(cmd: &mut Command, what: &str, log: &Path) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    let mut f = fs::OpenOptions::new().create(true).append(true).open(log)?;
    f.write_all(&out.stdout)?;
    f.write_all(&out.stderr)?;
    if !out.status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("{what} failed ({}); last lines of {}:\n{}", out.status, log.display(), tail.join("\n"));
    }
    Ok(())
}

/// Build the Debian 13 base image into `opts.out` (image.json, base.qcow2, vmlinuz, initrd.img).
/// Reuses an existing image of the same recipe unless `force`.
pub fn build(opts: &BuildOptions, note: &dyn Fn(&str)) -> Result<Built> {
    let recipe = recipe_sha256();
    let manifest_path = opts.out.join("image.json");
    if !opts.force {
        if let Ok(m) = fs::read_to_string(&manifest_path).map_err(anyhow::Error::from).and_then(|t| Ok(serde_json::from_str::<ImageManifest>(&t)?)) {
            if m.recipe_sha256 == recipe && opts.out.join(&m.disk).is_file() {
                return Ok(Built::Cached(m));
            }
        }
    }
    check_build_tools()?;
    let started = std::time::Instant::now();
    fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let work = opts.out.join(format!(".build-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let result = build_in(&work, opts, &recipe, started, note);
    let _ = fs::remove_dir_all(&work);
    let m = result?;
    Ok(Built::Fresh(m))
}

fn build_in(work: &Path, opts: &BuildOptions, recipe: &str, started: std::time::Instant, note: &dyn Fn(&str)) -> Result<ImageManifest> {
    let root = work.join("rootfs");
    let log = opts.out.join("build.log");
    let _ = fs::remove_file(&log);
    note(&format!("debootstrap {SUITE} from {} (about 1–3 minutes)", opts.mirror));
    run(
        Command::new("debootstrap").arg("--variant=minbase").arg(format!("--include={}", PACKAGES.join(","))).arg(SUITE).arg(&root).arg(&opts.mirror),
        "debootstrap",
        &log,
    )?;

    note("configuring the image (network, cloud-init, locale, no host keys)");
    let w = |rel: &str, text: &str| -> Result<()> {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("file in a folder"))?;
        fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    w("etc/hostname", "sgbox\n")?;
    w("etc/hosts", "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")?;
    w("etc/fstab", FSTAB)?;
    w("etc/systemd/network/90-dhcp.network", NETWORK)?;
    w("etc/cloud/cloud.cfg.d/90-sgbox-local.cfg", CLOUD_CFG)?;
    w("etc/default/locale", "LANG=en_US.UTF-8\n")?;
    let gen = fs::read_to_string(root.join("etc/locale.gen")).unwrap_or_default();
    w("etc/locale.gen", &format!("{gen}\nen_US.UTF-8 UTF-8\n"))?;
    run(Command::new("chroot").arg(&root).args(["systemctl", "enable", "systemd-networkd", "systemd-resolved"]), "enabling networkd", &log)?;
    // Host keys are cloud-init's (ed25519 and ecdsa: `ssh_genkeytypes` above). Debian 13's
    // sshd-keygen.service runs `ssh-keygen -A` at a first boot after cloud-init's ssh module, so
    // every box also got a 3072-bit RSA key, which the recipe never asked for and which takes
    // seconds of an emulated CPU to make. ssh.service only wants it.
    run(Command::new("chroot").arg(&root).args(["systemctl", "mask", "sshd-keygen.service"]), "masking sshd-keygen", &log)?;
    run(Command::new("chroot").arg(&root).arg("locale-gen"), "locale-gen", &log)?;
    run(Command::new("chroot").arg(&root).args(["apt-get", "clean"]), "apt-get clean", &log)?;
    let _ = fs::remove_dir_all(root.join("var/lib/apt/lists"));
    fs::create_dir_all(root.join("var/lib/apt/lists/partial"))?;
    let n = disable_unconfined_profiles(&root.join("etc/apparmor.d"))?;
    note(&format!("{n} AppArmor profiles that only name a program (unconfined) disabled"));
    // Per-instance identity: cloud-init makes host keys on first boot, systemd a machine id.
    for e in fs::read_dir(root.join("etc/ssh"))? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with("ssh_host_") {
            fs::remove_file(e.path())?;
        }
    }
    fs::write(root.join("etc/machine-id"), "")?;
    // D-Bus's package leaves its own copy of a machine id, which systemd takes over an empty
    // /etc/machine-id at first boot: every box of the image would share one. Linked, as Debian's
    // cloud images do.
    let dbus = root.join("var/lib/dbus/machine-id");
    let _ = fs::remove_file(&dbus);
    if dbus.parent().is_some_and(Path::is_dir) {
        std::os::unix::fs::symlink("/etc/machine-id", &dbus).context("linking D-Bus's machine id")?;
    }

    let tmp_out = work.join("out");
    fs::create_dir_all(&tmp_out)?;
    fs::copy(root.join("vmlinuz"), tmp_out.join("vmlinuz")).context("copying the kernel (is linux-image-cloud-amd64 installed?)")?;
    fs::copy(root.join("initrd.img"), tmp_out.join("initrd.img")).context("copying the initrd")?;

    note("making the disk image (ext4 from the tree, then qcow2)");
    let raw = work.join("base.raw");
    run(Command::new("mkfs.ext4").args(["-q", "-L", "rootfs", "-d"]).arg(&root).arg(&raw).arg("4G"), "mkfs.ext4", &log)?;
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(tmp_out.join("base.qcow2")), "qemu-img convert", &log)?;
    fs::remove_file(&raw)?;

    for f in ["base.qcow2", "vmlinuz", "initrd.img"] {
        fs::rename(tmp_out.join(f), opts.out.join(f))?;
    }
    let m = ImageManifest {
        format: 1,
        name: format!("sgbox-{IMAGE_DIR_NAME}"),
        suite: SUITE.into(),
        disk: "base.qcow2".into(),
        kernel: "vmlinuz".into(),
        initrd: "initrd.img".into(),
        cmdline: KERNEL_CMDLINE.into(),
        recipe_sha256: recipe.into(),
        built_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        disk_bytes: fs::metadata(opts.out.join("base.qcow2"))?.len(),
        build_seconds: started.elapsed().as_secs_f64(),
        release: None,
        bake_recipe: None,
    };
    write_atomic(&opts.out.join("image.json"), serde_json::to_string_pretty(&m)?.as_bytes(), 0o644)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_apparmor_profiles_that_confine_nothing_are_disabled() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        // Debian 13's crun profile, as shipped (its comment says "profile" too).
        let crun = "# This profile allows everything and only exists to give the\n# application a name instead of having the label \"unconfined\"\n\nabi <abi/4.0>,\ninclude <tunables/global>\n\nprofile crun /usr/bin/crun flags=(unconfined) {\n  userns,\n\n  include if exists <local/crun>\n}\n";
        fs::write(d.join("crun"), crun).unwrap();
        fs::write(d.join("lsb_release"), "profile lsb_release /usr/bin/lsb_release {\n  /usr/bin/lsb_release r,\n}\n").unwrap();
        fs::write(d.join("mixed"), "profile a /a flags=(unconfined) {\n}\nprofile b /b {\n  /b r,\n}\n").unwrap();
        fs::create_dir_all(d.join("abstractions")).unwrap();
        fs::write(d.join("abstractions/base"), "profile x flags=(unconfined) {}\n").unwrap();
        assert_eq!(disable_unconfined_profiles(d).unwrap(), 1);
        assert_eq!(fs::read_link(d.join("disable/crun")).unwrap(), Path::new("/etc/apparmor.d/crun"));
        let disabled: Vec<_> = fs::read_dir(d.join("disable")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(disabled, ["crun"], "the confining and mixed profiles stay");
        // Again: the link is there already, nothing else changes.
        assert_eq!(disable_unconfined_profiles(d).unwrap(), 1);
        assert_eq!(disable_unconfined_profiles(&d.join("none")).unwrap(), 0);
    }

    #[test]
    fn opens_folders_and_disks_and_refuses_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let err = open(tmp.path()).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("base-image"));
        assert!(err.message.contains("without image.json"), "{err}");

        let q = tmp.path().join("disk.qcow2");
        fs::write(&q, b"QFI\xfb\0\0\0\x03rest").unwrap();
        let b = open(&q).unwrap();
        assert_eq!(b.format, "qcow2");
        assert!(b.kernel.is_none());

        let junk = tmp.path().join("notes.txt");
        fs::write(&junk, "hello").unwrap();
        assert!(open(&junk).unwrap_err().message.contains("not a qcow2 or raw"));

        let m = ImageManifest {
            format: 1,
            name: "x".into(),
            suite: SUITE.into(),
            disk: "disk.qcow2".into(),
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            cmdline: KERNEL_CMDLINE.into(),
            recipe_sha256: recipe_sha256(),
            built_at: "2026-11-21T00:00:00Z".into(),
            disk_bytes: 1,
            release: None,
            bake_recipe: None,
            build_seconds: 1.0,
        };
        fs::write(tmp.path().join("image.json"), serde_json::to_string(&m).unwrap()).unwrap();
        assert!(open(tmp.path()).unwrap_err().message.contains("vmlinuz"), "missing kernel is named");
        fs::write(tmp.path().join("vmlinuz"), "k").unwrap();
        fs::write(tmp.path().join("initrd.img"), "i").unwrap();
        let b = open(tmp.path()).unwrap();
        assert_eq!(b.kernel.unwrap().cmdline, KERNEL_CMDLINE);
    }

    /// Serve `files` over HTTP on 127.0.0.1 for `n` requests.
    fn serve(files: Vec<(&'static str, Vec<u8>)>, n: usize) -> String {
        use std::io::{BufRead, BufReader};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for _ in 0..n {
                let (mut c, _) = l.accept().unwrap();
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap() <= 2 {
                        break;
                    }
                }
                match files.iter().find(|(n, _)| *n == path) {
                    Some((_, body)) => {
                        write!(c, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
                        c.write_all(body).unwrap();
                    }
                    None => write!(c, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap(),
                }
            }
        });
        base
    }

    #[test]
    fn downloads_are_kept_only_when_the_sha512_matches() {
        let body = b"QFI\xfb pretend this is a qcow2".to_vec();
        let good = format!("{}  {GENERICCLOUD_FILE}\n", hex(&Sha512::digest(&body)));
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("img.qcow2");

        let base = serve(vec![("SHA512SUMS", good.into_bytes()), (GENERICCLOUD_FILE, body.clone())], 2);
        download_checked(&base, GENERICCLOUD_FILE, &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), body);

        let dest2 = tmp.path().join("img2.qcow2");
        let bad = format!("{}  {GENERICCLOUD_FILE}\n", "0".repeat(128));
        let base = serve(vec![("SHA512SUMS", bad.into_bytes()), (GENERICCLOUD_FILE, body)], 2);
        let err = download_checked(&base, GENERICCLOUD_FILE, &dest2).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        assert!(!dest2.exists() && !dest2.with_extension("part").exists(), "a bad download is discarded");

        let base = serve(vec![("SHA512SUMS", b"abc  other.qcow2\n".to_vec())], 1);
        let err = download_checked(&base, GENERICCLOUD_FILE, &tmp.path().join("x")).unwrap_err().to_string();
        assert!(err.contains("does not list"), "{err}");
    }

    #[test]
    fn recipe_changes_with_the_package_list() {
        assert_eq!(recipe_sha256(), recipe_sha256());
        assert!(KERNEL_CMDLINE.contains("root=LABEL=rootfs"), "never /dev/vda: the data disk can take it");
    }
}
