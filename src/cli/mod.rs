//! Command-line types (clap derive) and nothing else: commands receive resolved settings.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Sourcegraph in a box: a working, secure, upgradable Sourcegraph with one command.
#[derive(Debug, Parser)]
#[command(name = "sgbox", version, about, max_term_width = 100)]
pub struct Cli {
    /// Deployment settings file (sgbox.toml); flags and SGBOX_* variables override it.
    #[arg(short = 'f', long = "config", global = true, env = "SGBOX_CONFIG", hide_env_values = true, value_name = "SGBOX_TOML")]
    pub config: Option<PathBuf>,

    /// Folder holding each deployment's state (secrets, SSH key, resource ids), one subfolder per
    /// deployment. Default: the per-user data directory.
    #[arg(long, global = true, env = "SGBOX_STATE_DIR", hide_env_values = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// More detail on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Result format on stdout. `json` never prompts, so commands that would ask need --yes.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// Answer yes to confirmations and never prompt.
    #[arg(short = 'y', long, global = true)]
    pub yes: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// Who an IAM policy is for (`iam-policy --for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyFor {
    /// The user or role that runs boxes.
    Box,
    /// The role of the image pipeline (`image build`).
    ImageBuild,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write every file the box needs (cloud-init user-data, compose project, systemd and Docker
    /// settings) into a folder, without touching any cloud.
    Render(RenderArgs),
    /// Ask for every setting not given (on a terminal), then write them as a sgbox.toml that
    /// `sgbox -f FILE up` reads back unchanged. Nothing is created.
    Init(InitArgs),
    /// Show the resolved settings, machine size, release and what `up` would create.
    Plan(PlanArgs),
    /// List the known Sourcegraph releases, or plan an upgrade path between two of them.
    Versions(VersionsArgs),
    /// Create the box and wait until Sourcegraph answers at the chosen release. On a terminal it
    /// asks for every setting not given, shows the plan and asks to confirm.
    Up(UpArgs),
    /// Show the box: machine state, address, release and the health of every service.
    Status(TargetArgs),
    /// Delete the box. The data disk is kept unless --delete-data.
    Down(DownArgs),
    /// Open a shell on the box, or run a command there (`sgbox ssh -- docker ps`).
    Ssh(SshArgs),
    /// Show the logs of one service (or all; `cloud-init` for the first boot's log).
    Logs(LogsArgs),
    /// Build machine images.
    Image(ImageArgs),
    /// Upgrade the box in place to another release: standard or multi-version in one command,
    /// with a data-disk snapshot first and an automatic rollback. A re-run resumes.
    Upgrade(UpgradeArgs),
    /// Put the box back to the release and data of before its last upgrade (its snapshot).
    Rollback(RollbackArgs),
    /// The deployments and upgrades of a box: when, from, to, by whom.
    History(TargetArgs),
    /// The data snapshots a box keeps (one per upgrade) and disks a restore set aside; `--prune`
    /// deletes all but the newest.
    Snapshots(SnapshotsArgs),
    /// The site admin `up` created: username, email and password (printed only here).
    Admin(TargetArgs),
    /// Print the least-privilege IAM policy sgbox needs (JSON): attach it to the user or role
    /// that runs sgbox (`--for image-build`: to the one the image pipeline assumes).
    IamPolicy {
        /// The cloud (only aws has one).
        #[arg(long, value_name = "CLOUD", default_value = "aws")]
        cloud: String,
        /// What the policy is for: running boxes (up, status, upgrade, rollback, down), or
        /// building machine images (image build).
        #[arg(long = "for", value_enum, value_name = "WHAT", default_value = "box")]
        r#for: PolicyFor,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The deployment's settings as flags; each is also a key of sgbox.toml and an SGBOX_* variable.
#[derive(Debug, Args, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeploymentArgs {
    /// Deployment name: names cloud resources and the state folder [default: sourcegraph].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Where the box runs: aws, gcp, or local (a QEMU VM on this machine, for evaluation).
    #[arg(long, value_name = "CLOUD")]
    pub cloud: Option<String>,
    /// Cloud region [default: the cloud's own default, e.g. AWS_REGION].
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Zone within the region.
    #[arg(long, value_name = "ZONE")]
    pub zone: Option<String>,
    /// Size tier: XS, S, M, L or XL (Sourcegraph's users/repos table) [default: XS].
    #[arg(long, value_name = "TIER")]
    pub size: Option<String>,
    /// Machine type instead of the tier's (at least 8 vCPU / 32 GiB on clouds; local-<CPUs>x<GiB>
    /// on local).
    #[arg(long, value_name = "TYPE")]
    pub instance_type: Option<String>,
    /// Size of the data disk in GB [default: 250 on clouds, 20 on local].
    #[arg(long, value_name = "GB")]
    pub data_disk_gb: Option<String>,
    /// Sourcegraph version: latest, a minor (7.5, its newest patch) or an exact release.
    #[arg(long, value_name = "VERSION")]
    pub version: Option<String>,
    /// Registry serving Sourcegraph's images as HOST[:PORT][/PREFIX]/NAME (http:// for plain HTTP).
    #[arg(long, value_name = "REGISTRY")]
    pub registry_mirror: Option<String>,
    /// digest (the mirror has the official images) or tags-only (rebuilt images) [default: digest].
    #[arg(long, value_name = "MODE")]
    pub mirror_mode: Option<String>,
    /// DNS name of the box (needed for TLS).
    #[arg(long, value_name = "HOST")]
    pub hostname: Option<String>,
    /// TLS: none, letsencrypt (needs --hostname and --tls-email) or custom (needs --tls-cert and
    /// --tls-key) [default: none].
    #[arg(long, value_name = "MODE")]
    pub tls: Option<String>,
    /// Contact email for Let's Encrypt.
    #[arg(long, value_name = "EMAIL")]
    pub tls_email: Option<String>,
    /// PEM certificate chain for custom TLS.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<String>,
    /// PEM private key for custom TLS.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<String>,
    /// Network allowed to reach SSH, e.g. 203.0.113.7/32 [default: your own public address].
    #[arg(long, value_name = "CIDR")]
    pub ssh_cidr: Option<String>,
    /// Allow --ssh-cidr 0.0.0.0/0. SSH open to the whole internet is almost never what you want.
    #[arg(long)]
    pub allow_ssh_from_anywhere: bool,
    /// Network allowed to reach Sourcegraph over HTTP(S) [default: the --ssh-cidr]. Open it to
    /// everyone with 0.0.0.0/0 (and ::/0) once you have claimed the site.
    #[arg(long, value_name = "CIDR")]
    pub web_cidr: Option<String>,
    /// Allow --web-cidr 0.0.0.0/0 with --tls none: Sourcegraph over plain, unencrypted HTTP to
    /// the whole internet (passwords and code in clear text).
    #[arg(long)]
    pub allow_plain_http_from_anywhere: bool,
    /// Accept an instance type below Sourcegraph's minimum (8 vCPU, 32 GiB); it will be slow or
    /// run out of memory.
    #[arg(long)]
    pub allow_undersized: bool,
    /// Your docker-compose.override.yaml for a new box: merged over the release's compose file
    /// from the first start on, and yours on the box from then on (sgbox never overwrites it).
    #[arg(long, value_name = "FILE")]
    pub compose_override: Option<String>,
    /// AWS: boot this AMI instead of Debian's newest Debian 13 (it must run cloud-init).
    #[arg(long, value_name = "AMI")]
    pub image_id: Option<String>,
    /// AWS: the subnet for the box [default: the default VPC's].
    #[arg(long, value_name = "SUBNET")]
    pub subnet_id: Option<String>,
    /// Local cloud: the base disk image (a Debian 13 cloud qcow2) or a folder written by
    /// `sgbox image build --cloud local` [default: the built image if present, else Debian's
    /// genericcloud image, downloaded once].
    #[arg(long, value_name = "PATH")]
    pub base_image: Option<String>,
    /// Local cloud: auto (KVM if a probe boot works, else TCG), kvm or tcg [default: auto].
    #[arg(long, value_name = "ACCEL")]
    pub accel: Option<String>,
    /// Local cloud: port on 127.0.0.1 forwarded to the VM's SSH [default: a free port].
    #[arg(long, value_name = "PORT")]
    pub ssh_port: Option<String>,
    /// Local cloud: port on 127.0.0.1 forwarded to the VM's HTTP (80) [default: a free port].
    #[arg(long, value_name = "PORT")]
    pub http_port: Option<String>,
    /// Local cloud: port on 127.0.0.1 forwarded to the VM's HTTPS (443) [default: a free port].
    #[arg(long, value_name = "PORT")]
    pub https_port: Option<String>,
}

impl DeploymentArgs {
    /// The flags as (settings key, value) pairs: the key is the long flag (the field's name in
    /// kebab case), so a new setting is a field here and a key in `settings`, nothing more.
    pub fn pairs(&self) -> Vec<(String, Option<String>)> {
        let serde_json::Value::Object(fields) = serde_json::to_value(self).expect("flags serialize") else { unreachable!("a struct") };
        fields
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => Some(s),
                    serde_json::Value::Bool(true) => Some("true".to_string()),
                    _ => None,
                };
                (k, text)
            })
            .collect()
    }
}

/// Waiting and host-key options shared by the commands that reach the box.
#[derive(Debug, Args, Default)]
pub struct ReachArgs {
    /// Trust whatever SSH host key the box offers instead of checking it against the
    /// fingerprints its console printed. Only for boxes whose console cannot be read.
    #[arg(long)]
    pub insecure_accept_host_key: bool,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub deployment: DeploymentArgs,
    #[command(flatten)]
    pub reach: ReachArgs,
    /// Give up waiting for the box after this long (e.g. 20m, 1h).
    #[arg(long, value_name = "DURATION", default_value = "30m")]
    pub timeout: String,
    /// Stop once the resources exist and the machine runs; do not wait for Sourcegraph.
    #[arg(long)]
    pub no_wait: bool,
}

/// Which deployment a command acts on. Its recorded settings fill in the rest.
#[derive(Debug, Args, Default)]
pub struct TargetArgs {
    /// Deployment name [default: the config file's, else sourcegraph].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// The cloud, when the deployment's local record is gone.
    #[arg(long, value_name = "CLOUD")]
    pub cloud: Option<String>,
    /// The region, when the deployment's local record is gone.
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    #[command(flatten)]
    pub reach: ReachArgs,
}

impl TargetArgs {
    pub fn pairs(&self) -> Vec<(String, Option<String>)> {
        vec![("name".into(), self.name.clone()), ("cloud".into(), self.cloud.clone()), ("region".into(), self.region.clone())]
    }
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The release to go to: X.Y.Z, X.Y (its newest patch) or latest [default: latest; an
    /// interrupted upgrade resumes to its own target].
    #[arg(long, value_name = "VERSION")]
    pub to: Option<String>,
    /// Print the plan (steps, downtime, snapshot, disk needed) and the preflight checks; change
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Allow going to an older release (migrator downgrade). Never across the Postgres 16 line.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// How long sgbox waits for the box at each check (services healthy, Sourcegraph answering).
    #[arg(long, value_name = "DURATION", default_value = "60m")]
    pub timeout: String,
    /// How long one step on the box (a pull, a migration, a start) may run before the box stops
    /// it. Migrating a large instance (Postgres 12 to 16, many versions) can take hours.
    #[arg(long, value_name = "DURATION", default_value = "12h")]
    pub step_limit: String,
    /// Take the box's lease even though another sgbox holds it (only when that one is gone for
    /// good: two upgrades at once corrupt the box).
    #[arg(long)]
    pub break_lock: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// How long the restore and each wait may take.
    #[arg(long, value_name = "DURATION", default_value = "30m")]
    pub timeout: String,
    /// Take the box's lease even though another sgbox holds it (only when that one is gone).
    #[arg(long)]
    pub break_lock: bool,
}

#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Delete all snapshots but the newest --keep, and every data disk a restore set aside.
    #[arg(long)]
    pub prune: bool,
    /// How many of the newest snapshots --prune keeps.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub keep: usize,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Also delete the data disk (repositories, databases). Without it the disk is kept, and a
    /// later `up` of the same name reuses it.
    #[arg(long)]
    pub delete_data: bool,
    /// How long to wait for the machine to shut down and resources to disappear.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub timeout: String,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Command to run on the box (after `--`); without one, an interactive shell. Piped standard
    /// input is sent to the command, then end of file.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// A compose service (e.g. sourcegraph-frontend-0), or `cloud-init`. Default: all services.
    #[arg(value_name = "SERVICE")]
    pub service: Option<String>,
    /// Lines from the end of each log.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub tail: u32,
    /// Keep following the log.
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a machine image. AWS: an AMI with a Sourcegraph release baked in (a temporary
    /// builder bakes it and is removed; copies to other regions; public only when asked). Local:
    /// Debian 13 from Debian packages with debootstrap (offline but for the package mirror;
    /// needs root), with Docker and Compose inside.
    Build {
        /// Which cloud the image is for.
        #[arg(long, value_name = "CLOUD")]
        cloud: String,
        /// The Sourcegraph release to bake in (exact, or a minor for its newest patch). AWS: the
        /// newest when not given; local: without it, only the Debian 13 base image is built.
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
        /// AWS: the region to build in [default: AWS_REGION's or the profile's].
        #[arg(long, value_name = "REGION")]
        region: Option<String>,
        /// AWS: regions to copy the image to, comma-separated.
        #[arg(long, value_name = "REGIONS", value_delimiter = ',')]
        copy_to: Vec<String>,
        /// AWS: share the image with everyone (implies --unencrypted). Refused before anything
        /// is built when the account blocks public AMI sharing.
        #[arg(long)]
        public: bool,
        /// AWS: unencrypted snapshots, so that the image can be made public later (by a run
        /// with --public, which then finds this image); still private.
        #[arg(long)]
        unencrypted: bool,
        /// AWS: print what would be built and created, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long the whole build may take (the bake pulls every image of the release).
        #[arg(long, value_name = "DURATION", default_value = "60m")]
        timeout: String,
        /// The registry the bake pulls from, as for `up` (the image then holds the mirror's
        /// references, which boxes with the same mirror use).
        #[arg(long, value_name = "URL")]
        registry_mirror: Option<String>,
        /// How the mirror holds the images: digest or tags-only, as for `up`.
        #[arg(long, value_name = "MODE")]
        mirror_mode: Option<String>,
        /// Output folder [default: the per-user cache, where `up --cloud local` looks first].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Debian package mirror [default: the one apt on this machine uses].
        #[arg(long, value_name = "URL")]
        mirror: Option<String>,
        /// Rebuild even if the folder holds an image of the same recipe.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub deployment: DeploymentArgs,
    /// Folder to write into (created if missing). An existing docker-compose.override.yaml there is
    /// kept.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub deployment: DeploymentArgs,
    /// Where to write the file [default: sgbox.toml in the deployment's state folder].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub deployment: DeploymentArgs,
    /// Print only the resolved settings, as a sgbox.toml that -f accepts.
    #[arg(long)]
    pub print_config: bool,
    /// Also read the cloud (read-only calls) and show what of the deployment exists already.
    #[arg(long, conflicts_with = "print_config")]
    pub live: bool,
}

#[derive(Debug, Args)]
pub struct VersionsArgs {
    #[command(subcommand)]
    pub command: Option<VersionsCommand>,
}

#[derive(Debug, Subcommand)]
pub enum VersionsCommand {
    /// Plan the upgrade from one release to another: standard or multi-version, with waypoints.
    Path {
        /// The deployed release (exact, e.g. 5.9.17785).
        #[arg(long, value_name = "VERSION")]
        from: String,
        /// The target: latest, a minor (its newest patch) or an exact release.
        #[arg(long, value_name = "VERSION")]
        to: String,
        /// The box's Postgres major (12 or 16) when it differs from what --from implies.
        #[arg(long, value_name = "MAJOR")]
        postgres: Option<u32>,
        /// Plan a downgrade (migrator downgrade) instead of refusing it.
        #[arg(long)]
        allow_downgrade: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_is_a_settings_key() {
        let pairs = DeploymentArgs::default().pairs();
        let cmd = Cli::command();
        let render = cmd.find_subcommand("render").unwrap();
        assert_eq!(pairs.len(), 28);
        // Every flag is a key of the settings table (from_flags panics on an unknown one).
        crate::settings::Layer::from_flags(pairs.iter().map(|(k, _)| (k.as_str(), Some("x".to_string()))));
        for (key, _) in pairs {
            assert!(render.get_arguments().any(|a| a.get_long() == Some(key.as_str())), "--{key} missing");
        }
    }
}
