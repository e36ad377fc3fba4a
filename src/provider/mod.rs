//! The cloud boundary: one [`Provider`] trait that every cloud implements, one module per cloud,
//! and one factory ([`for_deployment`]). Commands drive the steps in order (network, key, image,
//! instance, wait); each step is idempotent, finds what an earlier (possibly interrupted) run made
//! before creating anything, and records ids in the deployment's state folder as soon as they
//! exist.
//!
//! Errors at this boundary are [`ProviderError`]s; a bad request the user can fix is an
//! [`UserError`] inside, so it keeps exit code 2 through anyhow's chain.

pub mod aws;
pub mod local;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::error::UserError;
use crate::settings::{Cloud, Settings};
use crate::state::DeploymentDir;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Something the user asked for cannot work as given (nothing was created).
    #[error("{0}")]
    Input(#[source] UserError),
    #[error("{what} did not happen within {}", humantime::format_duration(*.waited))]
    Timeout { what: String, waited: Duration },
    #[error("{op}: {message}")]
    Failed { op: String, message: String },
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<UserError> for ProviderError {
    fn from(e: UserError) -> Self {
        ProviderError::Input(e)
    }
}

pub fn io_err(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> ProviderError {
    let op = op.into();
    move |source| ProviderError::Io { op, source }
}

pub fn failed(op: impl Into<String>, message: impl Into<String>) -> ProviderError {
    ProviderError::Failed { op: op.into(), message: message.into() }
}

pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

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

#[async_trait]
pub trait Provider: Send + Sync {
    /// Check tools, credentials and requested names/ports before anything is created.
    async fn preflight(&self) -> Result<()>;

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

    /// Whether [`Provider::swap_data_disk`] can put a snapshot back while the box runs.
    fn can_swap_data_disk(&self) -> bool {
        false
    }

    /// Put the data disk back to `snapshot` without restarting the box: the caller has stopped
    /// everything that uses the disk and unmounted it, and mounts it again afterwards. An error
    /// leaves the caller to fall back to [`Provider::restore_data_disk`].
    async fn swap_data_disk(&self, _snapshot: &str, _timeout: Duration) -> Result<()> {
        Err(failed("swapping the data disk", "this cloud restores by restarting the box"))
    }

    /// Everything the deployment owns, found by the cloud's own records (tags, files).
    async fn resources(&self) -> Result<Vec<Resource>>;

    /// Delete what `resources` lists (data disks only with `delete_data`). Returns what remains.
    async fn destroy(&self, delete_data: bool, timeout: Duration) -> Result<Vec<Resource>>;
}

/// The provider for a deployment's cloud.
pub async fn for_deployment(settings: &Settings, dir: &DeploymentDir, cache: PathBuf) -> Result<Box<dyn Provider>, UserError> {
    match settings.cloud {
        Cloud::Local => Ok(Box::new(local::Local::new(settings.clone(), dir.path.clone(), cache))),
        Cloud::Aws => Ok(Box::new(aws::Aws::new(settings.clone(), dir.path.clone()).await)),
        other => Err(UserError::field("cloud", format!("`up` on {other} is not available in this build yet"))
            .hint("use --cloud local, or `sgbox render` and apply the user-data yourself")),
    }
}
