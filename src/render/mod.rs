//! Rendering: from resolved settings and a catalog release to every file the box needs — the
//! cloud-init user-data and, inside it, the compose project, Caddy, systemd, Docker and kernel
//! settings. Pure and deterministic: the same inputs give byte-identical files.
//!
//! No secret is rendered. The database passwords are generated on the box at its first boot and
//! kept on its data disk (`cloud-init/secrets.sh`); a custom TLS certificate and key are sent by
//! `up` over SSH ([`TLS_CERT`], [`TLS_KEY`]), and the stack waits for them.

mod compose;

#[cfg(test)]
pub use compose::has_dependencies;
pub use compose::{handover_services, image_ref};

use std::io::Write;

use anyhow::{Context, Result};
use base64::Engine;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::release::catalog::Release;
use crate::settings::{Cloud, Settings, Tls};

/// Where the compose project lives on the box.
pub const BOX_DIR: &str = "/opt/sgbox";
/// Pinned compose project name: volumes are `sourcegraph_<name>` wherever the files live.
pub const PROJECT: &str = "sourcegraph";
pub const DATA_MOUNT: &str = "/mnt/sgbox-data";
pub const DATA_LABEL: &str = "sgbox-data";
/// The device name every provider gives the data disk where the cloud lets us name it.
pub const DATA_DISK_SERIAL: &str = "sgbox-data";
/// AWS rejects user-data above 16 KiB.
pub const AWS_USER_DATA_LIMIT: usize = 16 * 1024;

const T_COMPOSE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/docker-compose.yaml.tera"));
const T_OVERRIDE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/docker-compose.override.yaml"));
const T_CADDY: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/Caddyfile.tera"));
const T_UNIT: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/sourcegraph.service.tera"));
const T_USER_DATA: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/cloud-init/user-data.yaml.tera"));
const T_DATA_DISK: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/cloud-init/data-disk.sh.tera"));
const SECRETS_SH: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/cloud-init/secrets.sh"));
const DATA_RELEASE_SH: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/cloud-init/data-release.sh"));
const SITE_ADMIN_SH: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/cloud-init/site-admin.sh"));

/// Where `up` puts a custom TLS certificate chain and key (never in user-data).
pub const TLS_CERT: &str = "/opt/sgbox/tls/sourcegraph.pem";
pub const TLS_KEY: &str = "/opt/sgbox/tls/sourcegraph.key";
/// The boot script (data disk, then secrets), also installed so that sgbox can run it again
/// when the data disk arrives late.
pub const BOOT_SCRIPT: &str = "/usr/local/sbin/sgbox-data-disk";

pub struct Inputs<'a> {
    pub settings: &'a Settings,
    pub release: &'a Release,
    pub login: Login<'a>,
}

/// Who logs in to the box, and who claims its first site admin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Login<'a> {
    /// `sgbox up`: the `sgbox` user with this public key, alone allowed in by sshd; sgbox claims
    /// the site admin over SSH once Sourcegraph answers.
    Sgbox(&'a str),
    /// A machine image's default configuration ([`CONSOLE_CONFIG`]), for a launch without
    /// sgbox (a cloud console): the image's default user gets the launch's key pair, and the box
    /// claims its own first site admin before Caddy, the only way in from outside, starts.
    Console,
}

/// Where a baked image keeps its default configuration: cloud-init reads it as system
/// configuration, under any user-data, which wins key by key. It sets only keys that `sgbox up`'s
/// user-data sets too, so a box made by sgbox from the image gets nothing of it.
pub const CONSOLE_CONFIG: &str = "/etc/cloud/cloud.cfg.d/90-sgbox-image-default.cfg";
/// The site admin of a box launched without sgbox (its password root-only, on the data disk).
pub const SITE_ADMIN_SCRIPT: &str = "/usr/local/sbin/sgbox-site-admin";
pub const SITE_ADMIN_FILE: &str = "/mnt/sgbox-data/sgbox/site-admin";
/// The release the data disk's databases are at, and the machine that last ran it
/// (`cloud-init/data-release.sh` writes it at boot as `$MNT/sgbox/data-release`).
pub const DATA_RELEASE_FILE: &str = "/mnt/sgbox-data/sgbox/data-release";

/// One file for the box.
#[derive(Debug, Clone)]
pub struct BoxFile {
    /// Absolute path on the box.
    pub path: String,
    pub mode: u32,
    pub content: String,
    /// Created once and then owned by the user (the compose override).
    pub create_only: bool,
}

pub struct Bundle {
    pub user_data: String,
    pub files: Vec<BoxFile>,
    /// SHA-256 over the sgbox-managed files (all but the user's override and the metadata).
    pub rendered_sha256: String,
}

#[cfg(test)]
impl Bundle {
    pub fn file(&self, path: &str) -> Option<&BoxFile> {
        self.files.iter().find(|f| f.path == path)
    }

    pub fn compose(&self) -> &str {
        &self.file(&format!("{BOX_DIR}/docker-compose.yaml")).expect("compose is always rendered").content
    }
}

fn tera() -> Result<tera::Tera> {
    let mut t = tera::Tera::default();
    t.autoescape_on(vec![]);
    t.add_raw_templates([("compose", T_COMPOSE), ("caddy", T_CADDY), ("unit", T_UNIT), ("user-data", T_USER_DATA), ("data-disk", T_DATA_DISK)])
        .context("loading the embedded templates")?;
    // JSON string quoting is valid YAML double-quoted scalar syntax and keeps newlines intact.
    t.register_filter("q", |v: &tera::Value, _: &std::collections::HashMap<String, tera::Value>| {
        let s = match v {
            tera::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Ok(tera::Value::String(serde_json::to_string(&s).expect("strings serialize")))
    });
    Ok(t)
}

fn render_one(t: &tera::Tera, name: &str, ctx: &tera::Context) -> Result<String> {
    t.render(name, ctx).map_err(|e| {
        let mut msg = format!("rendering template {name}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        anyhow::anyhow!(msg)
    })
}

/// gzip, deterministic: mtime 0 and a fixed level, so identical input gives identical bytes.
pub(crate) fn gzip(data: &str) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    enc.write_all(data.as_bytes()).expect("in-memory write");
    enc.finish().expect("in-memory gzip")
}

pub(crate) fn gz_b64(data: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(gzip(data))
}

/// Debian's crun, the OCI runtime of the local box.
pub const CRUN: &str = "/usr/bin/crun";

/// The local box runs its containers with crun instead of runc. Under emulation every process
/// start is expensive, and Docker starts one per container and per health check (~12 probes every
/// 5–10 s): measured on a 2-vCPU TCG box with the 26 stand-ins up, runc's two Go processes per
/// probe kept both vCPUs 93 % busy and probes took 3–16 s; crun (one small C process) 38 % and
/// 0.2–0.6 s. Cloud VMs keep Docker's default runc.
pub fn uses_crun(cloud: Cloud) -> bool {
    cloud == Cloud::Local
}

/// The stable device path of the data disk, where the cloud gives one.
pub fn data_disk_by_id(cloud: Cloud) -> String {
    match cloud {
        Cloud::Local => format!("/dev/disk/by-id/virtio-{DATA_DISK_SERIAL}"),
        Cloud::Gcp => format!("/dev/disk/by-id/google-{DATA_DISK_SERIAL}"),
        // EBS on NVMe names disks by volume id, unknown when the user-data is written: the boot
        // script picks the non-root disk of the configured size instead.
        Cloud::Aws => String::new(),
    }
}

pub fn render(inp: &Inputs) -> Result<Bundle> {
    let s = inp.settings;
    let t = tera()?;
    let version = env!("CARGO_PKG_VERSION");
    let machine = s.machine();

    let compose = compose::render(&t, s, inp.release, machine.vcpus)?;

    let mut caddy_ctx = tera::Context::new();
    let (mode, email) = match &s.tls {
        Tls::None => ("none", ""),
        Tls::Letsencrypt { email } => ("letsencrypt", email.as_str()),
        Tls::Custom { .. } => ("custom", ""),
    };
    caddy_ctx.insert("tls", mode);
    caddy_ctx.insert("email", email);
    caddy_ctx.insert("hostname", &s.hostname.clone().unwrap_or_default());
    let caddyfile = render_one(&t, "caddy", &caddy_ctx)?;

    let mut unit_ctx = tera::Context::new();
    unit_ctx.insert("project", PROJECT);
    unit_ctx.insert("release", &inp.release.version.to_string());
    unit_ctx.insert("dir", BOX_DIR);
    unit_ctx.insert("data_mount", DATA_MOUNT);
    unit_ctx.insert("tls_key", &matches!(s.tls, Tls::Custom { .. }).then_some(TLS_KEY));
    unit_ctx.insert("before_key", &inp.release.services.keys().filter(|k| k.as_str() != "caddy").cloned().collect::<Vec<_>>().join(" "));
    unit_ctx.insert("site_admin", &(inp.login == Login::Console).then_some(SITE_ADMIN_SCRIPT));
    unit_ctx.insert("site_admin_file", SITE_ADMIN_FILE);
    let unit = render_one(&t, "unit", &unit_ctx)?;

    let mut daemon = serde_json::json!({
        "data-root": format!("{DATA_MOUNT}/docker"),
        "log-driver": "local",
        "log-opts": { "max-size": "50m", "max-file": "5" },
        "default-ulimits": { "nofile": { "Name": "nofile", "Hard": 262144, "Soft": 262144 } },
    });
    if let Some(m) = s.registry_mirror.as_ref().filter(|m| m.insecure) {
        daemon["insecure-registries"] = serde_json::json!([m.host()]);
    }
    if uses_crun(s.cloud) {
        daemon["runtimes"] = serde_json::json!({ "crun": { "path": CRUN } });
        daemon["default-runtime"] = serde_json::json!("crun");
    }

    let mut disk_ctx = tera::Context::new();
    disk_ctx.insert("label", DATA_LABEL);
    disk_ctx.insert("mount", DATA_MOUNT);
    // A launch from the image may size its data volume as it likes: any one non-root disk.
    disk_ctx.insert("size_gib", &if inp.login == Login::Console { 0 } else { s.data_disk_gb });
    disk_ctx.insert("by_id", &data_disk_by_id(s.cloud));
    disk_ctx.insert("release", &inp.release.version.to_string());
    disk_ctx.insert("standard_from", &standard_from(inp.release.version).join(" "));
    disk_ctx.insert("data_release", DATA_RELEASE_SH.trim_end());
    // The data disk first, then the secrets on it: without the disk, neither Docker nor secrets.
    let boot_script = format!("{}{SECRETS_SH}", render_one(&t, "data-disk", &disk_ctx)?);

    let f = |path: &str, mode: u32, content: String| BoxFile { path: path.to_string(), mode, content, create_only: false };
    let mut files = vec![
        f(&format!("{BOX_DIR}/docker-compose.yaml"), 0o644, compose),
        BoxFile {
            create_only: true,
            ..f(&format!("{BOX_DIR}/docker-compose.override.yaml"), 0o644, s.compose_override_text.clone().unwrap_or_else(|| T_OVERRIDE.to_string()))
        },
        f(&format!("{BOX_DIR}/Caddyfile"), 0o644, caddyfile),
        f(BOOT_SCRIPT, 0o755, format!("#!/bin/sh\n{boot_script}")),
    ];
    files.extend([
        f("/etc/systemd/system/sourcegraph.service", 0o644, unit),
        f("/etc/docker/daemon.json", 0o644, serde_json::to_string_pretty(&daemon)? + "\n"),
        f(
            "/etc/systemd/system/docker.service.d/60-sgbox.conf",
            0o644,
            // RequiresMountsFor alone is not enough: with no fstab line yet (the disk never came
            // at first boot) it requires only `/`, and Docker would fill the root disk.
            format!(
                "# sgbox: Docker's data lives on the data disk; never start without it.\n[Unit]\nRequiresMountsFor={DATA_MOUNT}\n\n[Service]\nExecStartPre=/bin/sh -c 'mountpoint -q {DATA_MOUNT} || {{ echo \"sgbox: the data disk is not mounted on {DATA_MOUNT}; Docker is not started on the root disk\" >&2; exit 1; }}'\nLimitNOFILE=262144\n"
            ),
        ),
        f(
            "/etc/sysctl.d/60-sourcegraph.conf",
            0o644,
            "# sgbox: zoekt maps many index shards; gitserver and searcher watch many files.\nvm.max_map_count = 300000\nfs.inotify.max_user_watches = 128000\n# When Caddy hands its ports to the next release's Caddy (both bind them with SO_REUSEPORT),\n# connections still queued on the closing listener move to the other one instead of being reset.\nnet.ipv4.tcp_migrate_req = 1\n".into(),
        ),
        // The host key fingerprints again on the console, in cloud-init's block format, after the
        // stack has started and every half hour: an AWS console keeps only its last 64 KiB, and a
        // boot's kernel and Docker messages can push cloud-init's block out of it.
        f(
            "/etc/systemd/system/sgbox-hostkeys.service",
            0o644,
            "# sgbox: print the SSH host key fingerprints on the console, where sgbox pins them from.\n[Unit]\nDescription=sgbox: SSH host key fingerprints on the console\nAfter=ssh.service sourcegraph.service\n\n[Service]\nType=oneshot\nExecStart=/bin/sh -c 'for k in /etc/ssh/ssh_host_*_key.pub; do ssh-keygen -l -f \"$k\"; done > /run/sgbox-hostkeys && { echo -----BEGIN SSH HOST KEY FINGERPRINTS-----; cat /run/sgbox-hostkeys; echo -----END SSH HOST KEY FINGERPRINTS-----; } > /dev/console'\n".into(),
        ),
        f(
            "/etc/systemd/system/sgbox-hostkeys.timer",
            0o644,
            "[Unit]\nDescription=sgbox: SSH host key fingerprints on the console, again\n\n[Timer]\nOnBootSec=3min\nOnUnitActiveSec=30min\n\n[Install]\nWantedBy=timers.target\n".into(),
        ),
        f("/etc/security/limits.d/60-sourcegraph.conf", 0o644, "# sgbox\n* soft nofile 262144\n* hard nofile 262144\n".into()),
        f(
            "/etc/ssh/sshd_config.d/00-sgbox.conf",
            0o644,
            match inp.login {
                Login::Sgbox(_) => "# sgbox: keys only, no root, only the sgbox user. Named 00- to sort first: sshd keeps the first value it reads.\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin no\nAllowUsers sgbox\n".into(),
                // The launch's key pair belongs to the image's default user.
                Login::Console => "# sgbox: keys only, no root. Named 00- to sort first: sshd keeps the first value it reads.\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin no\n".into(),
            },
        ),
    ]);
    if inp.login == Login::Console {
        files.push(f(SITE_ADMIN_SCRIPT, 0o755, SITE_ADMIN_SH.to_string()));
    }

    let mut h = Sha256::new();
    for file in files.iter().filter(|f| !f.create_only) {
        h.update(file.path.as_bytes());
        h.update([0]);
        h.update(file.content.as_bytes());
        h.update([0]);
    }
    let rendered_sha256 = format!("{:x}", h.finalize());

    #[derive(Serialize)]
    struct Meta<'a> {
        deployment: &'a str,
        cloud: String,
        release: String,
        compose_project: &'a str,
        sgbox_version: &'a str,
        rendered_sha256: &'a str,
    }
    let meta = Meta {
        deployment: &s.name,
        cloud: s.cloud.to_string(),
        release: inp.release.version.to_string(),
        compose_project: PROJECT,
        sgbox_version: version,
        rendered_sha256: &rendered_sha256,
    };
    files.push(f("/etc/sgbox/deployment.json", 0o644, serde_json::to_string_pretty(&meta)? + "\n"));

    #[derive(Serialize)]
    struct Wf {
        path: String,
        mode: String,
        /// The content gzipped in base64, where it is not written as text.
        b64: Option<String>,
        /// The content as a YAML literal block, indented for the template.
        text: Option<String>,
    }
    // The boot script travels once, in bootcmd (which runs before write_files, at every boot).
    // An image's default configuration has its files as text: it reaches the builder inside the
    // bake's gzipped user-data (EC2's 16 KiB), and text compresses there where base64 of gzip
    // does not; on the image it is read by people too.
    let wf: Vec<Wf> = files
        .iter()
        .filter(|f| f.path != BOOT_SCRIPT)
        .map(|f| {
            let text = (inp.login == Login::Console).then(|| literal_block(&f.content, 6)).flatten();
            let b64 = text.is_none().then(|| gz_b64(&f.content));
            Wf { path: f.path.clone(), mode: format!("{:04o}", f.mode), b64, text }
        })
        .collect();
    let boot = files.iter().find(|f| f.path == BOOT_SCRIPT).expect("the boot script is rendered");
    let bootcmd = format!(
        "mkdir -p {dir} && echo {b64} | base64 -d | gunzip > {BOOT_SCRIPT}.tmp && chmod 0755 {BOOT_SCRIPT}.tmp && mv {BOOT_SCRIPT}.tmp {BOOT_SCRIPT} && {BOOT_SCRIPT}",
        dir = BOOT_SCRIPT.rsplit_once('/').map_or("/", |(d, _)| d),
        b64 = gz_b64(&boot.content)
    );
    let mut ud = tera::Context::new();
    ud.insert("sgbox_version", version);
    ud.insert("release", &inp.release.version.to_string());
    ud.insert("deployment", &s.name);
    ud.insert("cloud", &s.cloud.to_string());
    ud.insert(
        "ssh_public_key",
        &match inp.login {
            Login::Sgbox(k) => Some(k.trim()),
            Login::Console => None,
        },
    );
    ud.insert("bootcmd", &bootcmd);
    ud.insert("boot_script", BOOT_SCRIPT);
    ud.insert("files", &wf);
    ud.insert("crun", &uses_crun(s.cloud));
    ud.insert("site_admin_file", SITE_ADMIN_FILE);
    let user_data = render_one(&t, "user-data", &ud)?;

    Ok(Bundle { user_data, files, rendered_sha256 })
}

/// `content` as the lines of a YAML literal block (`|`) indented by `indent`, when it reads back
/// byte for byte: one final newline, and no line that YAML would take for the block's end or
/// indentation (a first line starting with a space or a tab, a line of only blanks, a CR).
fn literal_block(content: &str, indent: usize) -> Option<String> {
    let body = content.strip_suffix('\n')?;
    if body.is_empty() || body.ends_with('\n') || body.starts_with([' ', '\t', '\n']) || body.contains('\r') {
        return None;
    }
    let blank = |l: &str| !l.is_empty() && l.trim_start_matches([' ', '\t']).is_empty();
    if body.lines().any(blank) || body.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return None;
    }
    let pad = " ".repeat(indent);
    Some(body.lines().map(|l| if l.is_empty() { String::new() } else { format!("{pad}{l}") }).collect::<Vec<_>>().join("\n"))
}

/// The releases whose databases `to` may start on at once: itself, and every release of the
/// catalog from which it is a standard upgrade (its migrator `up` does the rest). A new machine
/// on a kept data disk of any other release refuses to start (`cloud-init/data-release.sh`).
pub fn standard_from(to: crate::release::version::Version) -> Vec<String> {
    use crate::release::planner::{plan, PlanRequest, UpgradeKind};
    let cat = crate::release::catalog::catalog();
    cat.all()
        .map(|r| r.version)
        .filter(|&from| {
            plan(cat, PlanRequest { from, to, postgres_major: None, allow_downgrade: false })
                .is_ok_and(|p| matches!(p.kind, UpgradeKind::None | UpgradeKind::Standard))
        })
        .map(|v| v.to_string())
        .collect()
}

/// The default configuration a baked machine image carries ([`CONSOLE_CONFIG`]): the box of
/// `s`'s release as `up` would render it, for a launch without sgbox: HTTP on port 80 (no hostname
/// is known; the launch's security group says who reaches it), the image's default user with the
/// launch's key pair, any one data volume, and the site admin claimed by the box itself.
pub fn console_config(s: &Settings) -> Result<String> {
    let mut c = s.clone();
    c.tls = Tls::None;
    c.hostname = None;
    render(&Inputs { settings: &c, release: s.release(), login: Login::Console }).map(|b| b.user_data)
}

#[cfg(test)]
mod tests;
