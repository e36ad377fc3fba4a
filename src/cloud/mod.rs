//! The cloud boundary, and the only place cloud SDK types appear (inside `aws/` and `local/`).
//!
//! - [`Spec`] (`spec.rs`): what a deployment owns on its cloud, named and described, computed
//!   from the settings without I/O. `plan` prints it; the clouds build from it (names, tags,
//!   machine type, disk size), so naming lives in one place.
//! - [`Machine`]: one VM deployment's box on one cloud (today AWS and local): each step is
//!   idempotent, finds what an earlier (possibly interrupted) run made before creating anything,
//!   and records ids in the deployment's state folder as soon as they exist.
//! - [`ImageBuilder`]: machine images, which belong to no deployment.
//! - A managed-Kubernetes `Cluster` will sit beside `Machine`: it has no SSH, console or data
//!   disk, so it gets its own trait rather than stubs on this one.
//!
//! Errors here are [`CloudError`]s, classified ([`ErrorKind`]: throttled, not found, access
//! denied, quota, …) from the cloud's own codes in one place ([`classify`]); a bad request the
//! user can fix is a [`UserError`] inside, so it keeps exit code 2 through anyhow's chain.

pub mod aws;
pub mod image_spec;
pub mod local;
pub mod spec;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

pub use self::spec::Spec;
use crate::error::UserError;
use crate::settings::Cloud;

/// What kind of failure a cloud reported, whatever its wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Rate limited (the SDK has retried already).
    Throttled,
    NotFound,
    /// The credentials may not do this.
    AccessDenied,
    /// An account limit (instances, addresses, volumes, vCPUs).
    Quota,
    /// Exists already / in use / wrong state.
    Conflict,
    /// The request itself was refused as invalid.
    Invalid,
    Other,
}

/// An AWS error code's kind. (GCP's reasons map here too when it lands.)
pub fn classify(code: &str) -> ErrorKind {
    let c = code;
    if matches!(c, "Throttling" | "ThrottlingException" | "RequestLimitExceeded" | "TooManyRequestsException" | "SlowDown") {
        ErrorKind::Throttled
    } else if c.ends_with(".NotFound") || c.ends_with("NotFound") || c.starts_with("InvalidAMIID") || c == "InvalidParameterNotFound" {
        ErrorKind::NotFound
    } else if matches!(
        c,
        "UnauthorizedOperation"
            | "AccessDenied"
            | "AccessDeniedException"
            | "AuthFailure"
            | "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "OptInRequired"
    ) {
        ErrorKind::AccessDenied
    } else if c.ends_with("LimitExceeded") || c == "InsufficientInstanceCapacity" || c == "VcpuLimitExceeded" || c == "MaxSpotInstanceCountExceeded" {
        ErrorKind::Quota
    } else if c.ends_with(".Duplicate")
        || c.ends_with(".InUse")
        || c == "IncorrectState"
        || c == "IncorrectInstanceState"
        || c == "DependencyViolation"
    {
        ErrorKind::Conflict
    } else if c.starts_with("Invalid") || c == "MissingParameter" || c == "ValidationError" {
        ErrorKind::Invalid
    } else {
        ErrorKind::Other
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// Something the user asked for cannot work as given (nothing was created).
    #[error("{0}")]
    Input(#[source] UserError),
    #[error("{what} did not happen within {}", humantime::format_duration(Duration::from_secs(.waited.as_secs_f64().round() as u64)))]
    Timeout { what: String, waited: Duration },
    /// The cloud's API refused a call.
    #[error("{op}: {code}: {message}{}", api_hint(*.kind, op))]
    Api { op: String, kind: ErrorKind, code: String, message: String },
    /// A local tool or file operation of the cloud failed.
    #[error("{op}: {message}")]
    Failed { op: String, message: String },
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
}

/// What to do about an API error of this kind, said once for every call.
fn api_hint(kind: ErrorKind, op: &str) -> String {
    match kind {
        ErrorKind::AccessDenied => format!(
            "\n  fix: the credentials may not call {op}; use credentials with sgbox's IAM policy (README \"AWS permissions\"), or check AWS_PROFILE"
        ),
        ErrorKind::Quota => {
            "\n  fix: an account limit was reached; free what is unused, or ask AWS to raise the quota (Service Quotas), then re-run".into()
        }
        ErrorKind::Throttled => {
            "\n  fix: the API kept throttling after sgbox's retries; wait a minute and re-run (the run resumes where it stopped)".into()
        }
        _ => String::new(),
    }
}

impl From<UserError> for CloudError {
    fn from(e: UserError) -> Self {
        CloudError::Input(e)
    }
}

pub fn io_err(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> CloudError {
    let op = op.into();
    move |source| CloudError::Io { op, source }
}

pub fn failed(op: impl Into<String>, message: impl Into<String>) -> CloudError {
    CloudError::Failed { op: op.into(), message: message.into() }
}

pub type Result<T, E = CloudError> = std::result::Result<T, E>;

/// Lower-case hex of a digest (recipes, checksums).
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The disk image a box boots from.
#[derive(Clone, Debug, Serialize)]
pub struct BaseImage {
    /// Cloud image id, or the local disk file.
    pub id: String,
    pub description: String,
}

/// What to create besides what the provider's settings say: the rendered box.
pub struct InstanceSpec<'a> {
    pub user_data: &'a str,
}

/// How to reach a running box.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Endpoint {
    /// Address for SSH and HTTP (a public IP, or 127.0.0.1 for the local box's forwards).
    pub host: String,
    pub ssh_port: u16,
    pub http_port: u16,
    pub https_port: u16,
}

impl Endpoint {
    /// Where people open Sourcegraph: `https://<hostname>` once TLS is on (with the forwarded
    /// port on the local box), else the address over HTTP.
    pub fn site_url(&self, tls: &crate::settings::Tls, hostname: Option<&str>) -> String {
        match (tls, hostname) {
            (crate::settings::Tls::None, _) | (_, None) => self.url(),
            (_, Some(h)) if self.https_port == 443 => format!("https://{h}"),
            (_, Some(h)) => format!("https://{h}:{}", self.https_port),
        }
    }

    pub fn url(&self) -> String {
        if self.http_port == 80 {
            format!("http://{}", self.host)
        } else {
            format!("http://{}:{}", self.host, self.http_port)
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Nothing exists (never created, or destroyed).
    Absent,
    Stopped,
    Running,
}

/// One thing a deployment owns, for `status` and `down`.
#[derive(Clone, Debug, Serialize)]
pub struct Resource {
    pub kind: String,
    pub id: String,
    /// Kept by `down` unless told otherwise (data disks).
    pub kept_by_default: bool,
}

/// A data snapshot a deployment keeps (`sgbox upgrade` takes one before it changes anything).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    /// What it was taken for (e.g. `sgbox-pre-7.5.4453`).
    pub label: String,
    /// RFC 3339.
    pub created: String,
    pub size_gib: Option<u64>,
}

/// Snapshots to delete so that the newest `keep` remain (`all` is oldest first).
pub fn beyond_retention(all: &[Snapshot], keep: usize) -> Vec<Snapshot> {
    let mut sorted = all.to_vec();
    sorted.sort_by(|a, b| a.created.cmp(&b.created));
    let n = sorted.len().saturating_sub(keep);
    sorted.into_iter().take(n).collect()
}

/// A data disk the deployment kept without a machine (an `up` after `down`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptDisk {
    /// The volume id, or the disk file.
    pub id: String,
    /// The release its databases are at, as recorded beside it (none from an older sgbox).
    pub release: Option<crate::release::version::Version>,
}

/// One deployment's box on one cloud.
#[async_trait]
pub trait Machine: Send + Sync {
    /// Check tools, credentials and requested names/ports before anything is created.
    async fn preflight(&self) -> Result<()>;

    /// The data disk a new machine would start on, when the deployment has one and no machine.
    async fn kept_data_disk(&self) -> Result<Option<KeptDisk>>;

    /// Record beside the data disk the release its databases are at (when `up` creates it, and
    /// at every upgrade and rollback), so that an `up` after `down` checks its version before it
    /// creates anything. The box keeps its own record on the disk (`cloud-init/data-release.sh`).
    async fn record_data_release(&self, release: crate::release::version::Version) -> Result<()>;

    /// Before acting on an existing deployment: refuse when this run would reach another home
    /// than the deployment's (AWS: another account or region), where it would find nothing.
    async fn check_home(&self) -> Result<()> {
        Ok(())
    }

    /// Wait until a snapshot [`Machine::snapshot_data_disk`] returned is complete, so a restore
    /// from it can work; `note` hears progress. (Local snapshots are complete at once.)
    async fn wait_snapshot(&self, _snapshot: &str, _timeout: Duration, _note: &(dyn for<'s> Fn(&'s str) + Send + Sync)) -> Result<()> {
        Ok(())
    }

    /// The firewall/network the box lives in (security group, firewall rules, port forwards).
    async fn ensure_network(&self) -> Result<()>;

    /// Make the deployment's SSH public key usable by the instance.
    async fn ensure_key(&self, public_key: &str) -> Result<()>;

    async fn find_base_image(&self) -> Result<BaseImage>;

    /// Create (or find, or start) the instance with its separate data disk. Returns its id.
    async fn create_instance(&self, image: &BaseImage, spec: &InstanceSpec<'_>) -> Result<String>;

    async fn wait_running(&self, timeout: Duration) -> Result<Endpoint>;

    async fn state(&self) -> Result<InstanceState>;

    /// Address and ports, once running.
    async fn endpoint(&self) -> Result<Option<Endpoint>>;

    /// The serial console text so far: the only channel the host key can be pinned from.
    async fn console_output(&self) -> Result<String>;

    /// Snapshot the data disk; returns the snapshot's id. (`sgbox upgrade` takes one first, with
    /// the data filesystem frozen.)
    async fn snapshot_data_disk(&self, label: &str) -> Result<String>;

    /// Put the data disk back to a snapshot `snapshot_data_disk` took. The box is stopped for it
    /// and started again; returns once it runs. The disk it replaces is kept where the cloud
    /// cannot swap in place (AWS: tagged `data-before-restore`).
    async fn restore_data_disk(&self, snapshot: &str, timeout: Duration) -> Result<()>;

    /// Start a stopped box (a restore that stopped it and failed before starting it again);
    /// returns once it runs. Clouds that cannot leave a box stopped say how to start it.
    async fn start(&self, _timeout: Duration) -> Result<()> {
        Err(failed("starting the box", "start it with `sgbox up` (same name and settings)"))
    }

    /// Where to read the box's serial console, for a person diagnosing a box that never came up.
    fn console_hint(&self) -> String;

    /// Whether [`Machine::swap_data_disk`] can put a snapshot back while the box runs.
    fn can_swap_data_disk(&self) -> bool {
        false
    }

    /// Put the data disk back to `snapshot` without restarting the box: the caller has stopped
    /// everything that uses the disk and unmounted it, and mounts it again afterwards. An error
    /// leaves the caller to fall back to [`Machine::restore_data_disk`].
    async fn swap_data_disk(&self, _snapshot: &str, _timeout: Duration) -> Result<()> {
        Err(failed("swapping the data disk", "this cloud restores by restarting the box"))
    }

    /// The data snapshots the deployment keeps, oldest first.
    async fn snapshots(&self) -> Result<Vec<Snapshot>>;

    async fn delete_snapshot(&self, id: &str) -> Result<()>;

    /// Data disks a restore replaced and kept aside (AWS: volumes `data-before-restore`).
    async fn replaced_disks(&self) -> Result<Vec<Resource>> {
        Ok(vec![])
    }

    async fn delete_replaced_disk(&self, _id: &str) -> Result<()> {
        Ok(())
    }

    /// Everything the deployment owns, found by the cloud's own records (tags, files).
    async fn resources(&self) -> Result<Vec<Resource>>;

    /// Delete what `resources` lists (data disks only with `delete_data`). Returns what remains.
    async fn destroy(&self, delete_data: bool, timeout: Duration) -> Result<Vec<Resource>>;
}

/// The clouds this build can create boxes on (what the interactive provisioner offers).
pub const AVAILABLE: &[Cloud] = &[Cloud::Aws, Cloud::Local];

/// The machine of a deployment, built from its spec.
pub async fn machine(spec: &Spec, deployment_dir: &Path, cache: PathBuf) -> Result<Box<dyn Machine>, UserError> {
    match spec.cloud {
        Cloud::Local => Ok(Box::new(local::Local::new(spec.clone(), deployment_dir.to_path_buf(), cache))),
        Cloud::Aws => Ok(Box::new(aws::Aws::new(spec.clone(), deployment_dir.to_path_buf()).await)),
        other => Err(UserError::field("cloud", format!("`up` on {other} is not available in this build yet"))
            .hint("use --cloud local, or `sgbox render` and apply the user-data yourself")),
    }
}

/// Builds machine images: no deployment, no SSH into a running box of the user's.
pub trait ImageBuilder {
    /// The image, built (or found already built from the same recipe).
    fn build(&self, note: &dyn Fn(&str)) -> anyhow::Result<local::image::Built>;
}

/// The image builder for `cloud`.
pub fn image_builder(cloud: Cloud, out: PathBuf, mirror: Option<String>, force: bool) -> Result<Box<dyn ImageBuilder>, UserError> {
    match cloud {
        Cloud::Local => Ok(Box::new(local::image::LocalImageBuilder(local::image::BuildOptions {
            out,
            mirror: mirror.unwrap_or_else(local::image::host_mirror),
            force,
        }))),
        other => Err(UserError::field("--cloud", format!("image build for {other} is not available in this build yet")).hint("use --cloud local")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_are_classified_once_with_one_fix_each() {
        for (code, kind) in [
            ("RequestLimitExceeded", ErrorKind::Throttled),
            ("InvalidInstanceID.NotFound", ErrorKind::NotFound),
            ("InvalidAMIID.Malformed", ErrorKind::NotFound),
            ("UnauthorizedOperation", ErrorKind::AccessDenied),
            ("AddressLimitExceeded", ErrorKind::Quota),
            ("VcpuLimitExceeded", ErrorKind::Quota),
            ("InvalidPermission.Duplicate", ErrorKind::Conflict),
            ("VolumeInUse", ErrorKind::Other),
            ("InvalidParameterValue", ErrorKind::Invalid),
        ] {
            assert_eq!(classify(code), kind, "{code}");
        }
        let e =
            CloudError::Api { op: "RunInstances".into(), kind: ErrorKind::AccessDenied, code: "UnauthorizedOperation".into(), message: "no".into() };
        assert!(e.to_string().contains("may not call RunInstances"), "{e}");
        assert!(classify("Throttling") == ErrorKind::Throttled && e.to_string().contains("fix: the credentials"));
    }
}
