//! Command-line types (clap derive) and nothing else: commands receive resolved settings.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Sourcegraph in a box: a working, secure, upgradable Sourcegraph with one command.
#[derive(Debug, Parser)]
#[command(name = "sgbox", version, about, max_term_width = 100)]
pub struct Cli {
    /// Deployment settings file (sgbox.toml); flags and SGBOX_* variables override it.
    #[arg(short = 'f', long = "config", global = true, env = "SGBOX_CONFIG", value_name = "SGBOX_TOML")]
    pub config: Option<PathBuf>,

    /// Folder holding each deployment's state (secrets, SSH key, resource ids), one subfolder per
    /// deployment. Default: the per-user data directory.
    #[arg(long, global = true, env = "SGBOX_STATE_DIR", value_name = "DIR")]
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
    /// Show the resolved settings, machine size, release and what `up` would create.
    Plan(PlanArgs),
    /// List the known Sourcegraph releases, or plan an upgrade path between two of them.
    Versions(VersionsArgs),
    /// Print a shell completion script.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The deployment's settings as flags; each is also a key of sgbox.toml and an SGBOX_* variable.
#[derive(Debug, Args, Default)]
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
}

impl DeploymentArgs {
    /// The flags as (settings key, value) pairs.
    pub fn pairs(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("name", self.name.clone()),
            ("cloud", self.cloud.clone()),
            ("region", self.region.clone()),
            ("zone", self.zone.clone()),
            ("size", self.size.clone()),
            ("instance-type", self.instance_type.clone()),
            ("data-disk-gb", self.data_disk_gb.clone()),
            ("version", self.version.clone()),
            ("registry-mirror", self.registry_mirror.clone()),
            ("mirror-mode", self.mirror_mode.clone()),
            ("hostname", self.hostname.clone()),
            ("tls", self.tls.clone()),
            ("tls-email", self.tls_email.clone()),
            ("tls-cert", self.tls_cert.clone()),
            ("tls-key", self.tls_key.clone()),
            ("ssh-cidr", self.ssh_cidr.clone()),
            ("allow-ssh-from-anywhere", self.allow_ssh_from_anywhere.then(|| "true".to_string())),
        ]
    }
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
pub struct PlanArgs {
    #[command(flatten)]
    pub deployment: DeploymentArgs,
    /// Print only the resolved settings, as a sgbox.toml that -f accepts.
    #[arg(long)]
    pub print_config: bool,
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
        for (key, _) in pairs {
            assert!(render.get_arguments().any(|a| a.get_long() == Some(key)), "--{key} missing");
        }
    }
}
