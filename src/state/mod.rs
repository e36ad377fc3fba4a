//! The local state of deployments: one folder per deployment under the state root (mode 0700),
//! holding the SSH key and the site admin's credentials (mode 0600), the typed deployment record
//! (`deployment.json`: the settings a deployment was created with, its release, pinned host key
//! and history), all written atomically, and the lock that keeps two changing commands off one
//! deployment.
//!
//! The database passwords are not here: the box generates them and keeps them on its data disk
//! (see `render`), so they never travel, and stay with the data they open.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};

use crate::release::version::Version;
use crate::settings::Cloud;

/// Root of all deployments: `--state-dir`, else `SGBOX_STATE_DIR` (clap reads it), else the
/// per-user data dir.
pub fn state_root(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    let dirs = directories::ProjectDirs::from("dev", "sgbox", "sgbox")
        .context("finding the per-user data directory (set --state-dir or SGBOX_STATE_DIR)")?;
    Ok(dirs.data_dir().join("deployments"))
}

pub struct DeploymentDir {
    pub path: PathBuf,
}

impl DeploymentDir {
    pub fn new(root: &Path, name: &str) -> DeploymentDir {
        DeploymentDir { path: root.join(name) }
    }

    pub fn ensure(&self) -> Result<()> {
        fs::create_dir_all(&self.path).with_context(|| format!("creating the state folder {}", self.path.display()))?;
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700)).with_context(|| format!("restricting {}", self.path.display()))
    }

    /// Where the site admin's credentials are kept.
    pub fn admin_path(&self) -> PathBuf {
        self.path.join("admin.json")
    }

    /// The site admin's credentials, if `up` made them.
    pub fn admin(&self) -> Result<Option<Admin>> {
        let file = self.admin_path();
        if !file.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        // Never echo the file's content: it holds the password.
        serde_json::from_str(&text).map(Some).with_context(|| format!("{} is damaged (not the JSON sgbox wrote)", file.display()))
    }

    /// The site admin's credentials, generated and saved (0600) before they are first used, so a
    /// run interrupted after the site accepted them still has them.
    pub fn admin_or_new(&self, name: &str) -> Result<Admin> {
        if let Some(a) = self.admin()? {
            return Ok(a);
        }
        self.ensure()?;
        let a = Admin::generate(name);
        write_atomic(&self.admin_path(), (serde_json::to_string_pretty(&a)? + "\n").as_bytes(), 0o600)?;
        Ok(a)
    }

    /// Record that the site accepted the credentials (or was found claimed by them).
    pub fn save_admin(&self, a: &Admin) -> Result<()> {
        write_atomic(&self.admin_path(), (serde_json::to_string_pretty(a)? + "\n").as_bytes(), 0o600)
    }

    /// The deployment's SSH key pair (OpenSSH format), generated on first use. Returns the
    /// public key line.
    pub fn ssh_public_key(&self) -> Result<String> {
        let private = self.ssh_private_key_path();
        let public = self.path.join("id_ed25519.pub");
        if private.exists() && public.exists() {
            return Ok(fs::read_to_string(&public).with_context(|| format!("reading {}", public.display()))?.trim().to_string());
        }
        self.ensure()?;
        let key = ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .context("generating the deployment's SSH key")?;
        let mut key = key;
        key.set_comment(format!("sgbox-{}", self.path.file_name().and_then(|n| n.to_str()).unwrap_or("deployment")));
        let pem = key.to_openssh(ssh_key::LineEnding::LF).context("encoding the SSH key")?;
        let pubkey = key.public_key().to_openssh().context("encoding the SSH public key")?;
        write_atomic(&private, pem.as_bytes(), 0o600)?;
        write_atomic(&public, format!("{pubkey}\n").as_bytes(), 0o644)?;
        Ok(pubkey)
    }

    pub fn ssh_private_key_path(&self) -> PathBuf {
        self.path.join("id_ed25519")
    }

    pub fn record_path(&self) -> PathBuf {
        self.path.join("deployment.json")
    }

    pub fn known_hosts_path(&self) -> PathBuf {
        self.path.join("known_hosts")
    }

    /// The deployment's record, if `up` ever started it.
    pub fn record(&self) -> Result<Option<Record>> {
        let file = self.record_path();
        match fs::read_to_string(&file) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is damaged (not the JSON sgbox wrote)", file.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
        }
    }

    pub fn save_record(&self, r: &Record) -> Result<()> {
        self.ensure()?;
        write_atomic(&self.record_path(), serde_json::to_string_pretty(r)?.as_bytes(), 0o600)
    }

    /// Hold the deployment for a command that changes it (`up`, `down`, `upgrade`, `rollback`):
    /// an advisory lock on `lock` in its folder, released when the guard drops (or the process
    /// dies). A second sgbox working on the same deployment is refused at once, naming the first.
    pub fn lock(&self, what: &str) -> Result<Lock> {
        self.ensure()?;
        let path = self.path.join("lock");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                let holder = format!("{} (pid {}) since {}\n", what, std::process::id(), now_rfc3339());
                let _ = file.set_len(0);
                let _ = (&file).write_all(holder.as_bytes());
                Ok(Lock { _file: file })
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                anyhow::bail!(
                    "another sgbox is working on the deployment \"{}\": {}; wait for it to finish (its lock: {})",
                    self.path.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
                    holder.trim(),
                    path.display()
                )
            }
            Err(e) => Err(std::io::Error::from(e)).with_context(|| format!("locking {}", path.display())),
        }
    }

    pub fn remove_record(&self) -> Result<()> {
        for f in [self.record_path(), self.known_hosts_path()] {
            match fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", f.display())),
            }
        }
        Ok(())
    }
}

/// Held while a command changes the deployment; see [`DeploymentDir::lock`].
pub struct Lock {
    _file: fs::File,
}

/// What sgbox knows about a deployment it created: written before each step that changes the
/// world, so an interrupted run resumes instead of duplicating.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    pub name: String,
    pub cloud: Cloud,
    /// The release the box runs (or is being brought up at).
    pub release: Version,
    /// The resolved settings, as the sgbox.toml `-f` accepts.
    pub settings: String,
    pub created_at: String,
    pub instance_id: Option<String>,
    /// The pinned SSH host key (OpenSSH `type base64`), once verified against the console.
    pub host_key: Option<String>,
    pub url: Option<String>,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: String,
    pub action: String,
    pub release: Version,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Version>,
    pub by: String,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Who ran the command, for history entries.
/// `n` random alphanumerics.
pub fn random_token(n: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), n)
}

pub fn whoami() -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    let host = fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    }
}

/// Per-user cache (downloaded and built images, probe results): `SGBOX_CACHE_DIR`, else the
/// per-user cache dir.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SGBOX_CACHE_DIR") {
        return Ok(PathBuf::from(p));
    }
    let dirs = directories::ProjectDirs::from("dev", "sgbox", "sgbox").context("finding the per-user cache directory (set SGBOX_CACHE_DIR)")?;
    Ok(dirs.cache_dir().to_path_buf())
}

/// The first site admin, whom `up` creates through Sourcegraph's site-init.
#[derive(Clone, Serialize, Deserialize)]
pub struct Admin {
    pub username: String,
    pub email: String,
    pub password: String,
    /// When the site accepted these credentials (None: not yet).
    #[serde(default)]
    pub claimed_at: Option<String>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Admin({}, <redacted>)", self.username)
    }
}

impl Admin {
    fn generate(deployment: &str) -> Admin {
        let password = Alphanumeric.sample_string(&mut rand::rng(), 24);
        // .invalid never resolves (RFC 2606): the address is a placeholder the admin replaces.
        Admin { username: "admin".into(), email: format!("admin@{deployment}.sgbox.invalid"), password, claimed_at: None }
    }
}

/// Write a file so readers see the old or the new content, never a torn one, with `mode` from
/// the start (secrets are never briefly world-readable).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // A random name, created new: nobody can have placed a file or symlink there beforehand.
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        Alphanumeric.sample_string(&mut rand::rng(), 12)
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_and_key_are_generated_once_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = DeploymentDir::new(tmp.path(), "demo");
        assert!(d.admin().unwrap().is_none());
        let a = d.admin_or_new("demo").unwrap();
        let b = d.admin_or_new("demo").unwrap();
        assert_eq!(a.password, b.password);
        assert_eq!(a.password.len(), 24);
        assert_eq!(a.email, "admin@demo.sgbox.invalid");
        assert_eq!(format!("{a:?}"), "Admin(admin, <redacted>)");
        let mode = fs::metadata(d.admin_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k1 = d.ssh_public_key().unwrap();
        assert!(k1.starts_with("ssh-ed25519 "), "{k1}");
        assert_eq!(d.ssh_public_key().unwrap(), k1);
        let mode = fs::metadata(d.ssh_private_key_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(&d.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
    }

    #[test]
    fn atomic_writes_never_follow_a_planted_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("aws.json");
        // The old temp name was predictable: a symlink planted there was written through.
        let victim = tmp.path().join("victim");
        fs::write(&victim, "untouched").unwrap();
        std::os::unix::fs::symlink(&victim, tmp.path().join(format!(".aws.json.tmp{}", std::process::id()))).unwrap();
        write_atomic(&target, b"{}", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(fs::read_to_string(&target).unwrap(), "{}");
        let left: Vec<_> =
            fs::read_dir(tmp.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).collect();
        assert!(left.is_empty(), "no temp file left");
    }

    #[test]
    fn a_second_command_on_the_same_deployment_is_refused_until_the_first_ends() {
        let tmp = tempfile::tempdir().unwrap();
        let d = DeploymentDir::new(tmp.path(), "demo");
        let held = d.lock("upgrade").unwrap();
        let e = d.lock("down").err().expect("the lock is held");
        assert!(format!("{e:#}").contains("upgrade (pid"), "{e:#}");
        drop(held);
        assert!(d.lock("down").is_ok(), "released when the guard drops");
    }
}
