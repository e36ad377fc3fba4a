//! Deployment settings: one table of keys, resolved from flags > environment (`SGBOX_…`) >
//! `sgbox.toml` > the interactive provisioner's answers ([`wizard`]) > defaults, then validated
//! into [`Settings`].
//!
//! The config file is the flags, serialized: every key is a long flag of the same name, and
//! [`Settings::to_toml`] prints a file that `-f` accepts unchanged. Validation names the field,
//! where the value came from, and how to fix it.

mod checks;
mod layer;
pub mod wizard;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use self::checks::*;
use self::layer::{bad, relabel, KEYS};
pub use self::layer::{Layer, Source};
use crate::error::UserError;
use crate::release::catalog::catalog;
use crate::release::sizing::{self, MachineType, Size};
use crate::release::version::{Version, VersionSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    Aws,
    Gcp,
    Local,
}

impl fmt::Display for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cloud::Aws => "aws",
            Cloud::Gcp => "gcp",
            Cloud::Local => "local",
        })
    }
}

impl FromStr for Cloud {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "aws" => Ok(Cloud::Aws),
            "gcp" => Ok(Cloud::Gcp),
            "local" => Ok(Cloud::Local),
            _ => Err(format!("'{s}' is not a supported cloud")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorMode {
    /// Keep the official digests: the mirror serves byte-identical images.
    Digest,
    /// Drop digests: the mirror serves rebuilt images under the same tags.
    TagsOnly,
}

/// A registry that serves Sourcegraph's images as `HOST[:PORT][/PREFIX]/NAME:TAG`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mirror {
    /// `host[:port][/prefix]` without a scheme.
    pub base: String,
    /// Plain HTTP: Docker must be told the registry is insecure.
    pub insecure: bool,
}

impl Mirror {
    pub fn host(&self) -> &str {
        self.base.split('/').next().unwrap_or(&self.base)
    }

    fn parse(s: &str) -> Result<Mirror, String> {
        let (insecure, rest) = if let Some(r) = s.strip_prefix("http://") { (true, r) } else { (false, s.strip_prefix("https://").unwrap_or(s)) };
        let rest = rest.trim_end_matches('/');
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (hostname, port) = match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        };
        if let Some(p) = port {
            if p.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(format!("'{p}' is not a port number"));
            }
        }
        if !is_hostname(hostname) && hostname.parse::<IpAddr>().is_err() {
            return Err(format!("'{hostname}' is not a registry host name"));
        }
        if !path.is_empty()
            && !path.split('/').all(|seg| !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)))
        {
            return Err(format!("'{path}' is not a repository path (lowercase letters, digits, - _ . and /)"));
        }
        Ok(Mirror { base: rest.to_string(), insecure })
    }
}

impl fmt::Display for Mirror {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.insecure {
            f.write_str("http://")?;
        }
        f.write_str(&self.base)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum Tls {
    None,
    Letsencrypt { email: String },
    Custom { cert: PathBuf, key: PathBuf },
}

/// Validated settings of one deployment.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub name: String,
    pub cloud: Cloud,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub size: Size,
    pub instance_type: Option<String>,
    pub data_disk_gb: u32,
    /// Always an exact catalog release once resolved.
    pub version: Version,
    pub registry_mirror: Option<Mirror>,
    pub mirror_mode: MirrorMode,
    pub hostname: Option<String>,
    pub tls: Tls,
    pub ssh_cidr: Option<IpNet>,
    pub allow_ssh_from_anywhere: bool,
    /// Who may reach HTTP(S); `None` means the SSH CIDR (see [`Settings::web_cidr`]).
    pub web_cidr: Option<IpNet>,
    pub allow_plain_http_from_anywhere: bool,
    pub allow_undersized: bool,
    /// The user's docker-compose.override.yaml for a new box (the file as `up` read it). Only a
    /// new box gets it: from then on the box's copy is the user's.
    pub compose_override: Option<PathBuf>,
    #[serde(skip)]
    pub compose_override_text: Option<String>,
    /// Only for the local cloud.
    pub local: LocalSettings,
    /// Only for AWS.
    pub aws: AwsSettings,
}

/// AWS-only choices: an AMI instead of Debian's, a subnet instead of the default VPC's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AwsSettings {
    pub image_id: Option<String>,
    pub subnet_id: Option<String>,
}

/// How the local cloud runs its VM. Ports are on 127.0.0.1; `None` picks a free one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LocalSettings {
    /// A bootable disk image (qcow2/raw) or a folder made by `sgbox image build --cloud local`.
    pub base_image: Option<PathBuf>,
    pub accel: Accel,
    pub ssh_port: Option<u16>,
    pub http_port: Option<u16>,
    pub https_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when a probe boot shows it works, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Whether resolving reads the files that settings name (see [`Settings::recorded`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UserFiles {
    Read,
    Recorded,
}

pub const DEFAULT_NAME: &str = "sourcegraph";
pub const DEFAULT_CLOUD_DISK_GB: u32 = 250;
pub const DEFAULT_LOCAL_DISK_GB: u32 = 20;

impl Settings {
    /// Validate a merged layer. Every value is checked; the first problem is reported.
    pub fn resolve(layer: &Layer) -> Result<Settings, UserError> {
        Settings::resolve_with(layer, UserFiles::Read)
    }

    /// `resolve`, reading the user's files (TLS, compose override) or, for a deployment's record,
    /// taking their recorded paths as they are: they were read when the box was made, and a
    /// command on the box (`down` included) must not fail because a file moved since.
    fn resolve_with(layer: &Layer, files: UserFiles) -> Result<Settings, UserError> {
        let s = |k: &str| layer.get(k);

        let name = match s("name") {
            Some(v) => {
                let n = v.text.trim();
                if !is_deployment_name(n) {
                    return Err(bad("name", v, format!("'{n}' is not a deployment name"))
                        .hint("use 2–32 lowercase letters, digits and dashes, starting with a letter (e.g. sourcegraph-eval)"));
                }
                n.to_string()
            }
            None => DEFAULT_NAME.to_string(),
        };

        let cloud_val = match s("cloud") {
            Some(v) => v.clone(),
            None => {
                return Err(UserError::field("cloud", "no cloud given")
                    .hint("pass --cloud aws|gcp|local, set SGBOX_CLOUD, or add `cloud = \"aws\"` to sgbox.toml (on a terminal, `sgbox up` or `sgbox init` asks)"))
            }
        };
        let cloud: Cloud = cloud_val.text.parse().map_err(|m| bad("cloud", &cloud_val, m).hint("use aws, gcp or local"))?;

        let region = match s("region") {
            Some(v) => Some(validate_region(cloud, v)?),
            None => None,
        };
        let zone = match s("zone") {
            Some(v) => Some(validate_zone(cloud, v, region.as_deref())?),
            None => None,
        };

        let size = match s("size") {
            Some(v) => v.text.parse::<Size>().map_err(|e| relabel(e, "size", v))?,
            None => Size::XS,
        };

        let instance_type = match s("instance-type") {
            Some(v) => Some(validate_instance_type(cloud, v)?),
            None => None,
        };

        let data_disk_gb = match s("data-disk-gb") {
            Some(v) => {
                let n: u32 = v
                    .text
                    .trim()
                    .parse()
                    .map_err(|_| bad("data-disk-gb", v, format!("'{}' is not a whole number of GB", v.text)).hint("e.g. data-disk-gb = 500"))?;
                if !(10..=16_384).contains(&n) {
                    return Err(bad("data-disk-gb", v, format!("{n} GB is out of range"))
                        .hint("use 10 to 16384 GB; Sourcegraph recommends at least 250 GB of SSD on clouds"));
                }
                n
            }
            None if cloud == Cloud::Local => DEFAULT_LOCAL_DISK_GB,
            None => DEFAULT_CLOUD_DISK_GB,
        };

        let version = match s("version") {
            Some(v) => {
                let spec: VersionSpec = v.text.parse().map_err(|e: crate::release::version::ParseSpecError| bad("version", v, e))?;
                catalog().resolve(spec).map_err(|e| relabel(e, "version", v))?.version
            }
            None => catalog().latest().version,
        };

        let registry_mirror = match s("registry-mirror") {
            Some(v) => Some(Mirror::parse(v.text.trim()).map_err(|m| {
                bad("registry-mirror", v, m)
                    .hint("use HOST[:PORT][/PREFIX], e.g. registry.example.com/sourcegraph; prefix http:// for a plain-HTTP registry")
            })?),
            None => None,
        };
        let mirror_mode = match s("mirror-mode") {
            Some(v) => match v.text.trim() {
                "digest" => MirrorMode::Digest,
                "tags-only" => MirrorMode::TagsOnly,
                other => {
                    return Err(bad("mirror-mode", v, format!("'{other}' is not a mirror mode"))
                        .hint("use digest (the mirror serves the official images) or tags-only (rebuilt images)"))
                }
            },
            None => MirrorMode::Digest,
        };
        if registry_mirror.is_none() {
            if let Some(v) = s("mirror-mode") {
                if v.text.trim() != "digest" {
                    return Err(bad("mirror-mode", v, "only applies with a registry mirror").hint("set registry-mirror too, or drop mirror-mode"));
                }
            }
        }

        let hostname = match s("hostname") {
            Some(v) => {
                let h = v.text.trim().trim_end_matches('.').to_ascii_lowercase();
                if !is_hostname(&h) {
                    return Err(
                        bad("hostname", v, format!("'{}' is not a valid host name", v.text)).hint("use a DNS name such as sourcegraph.example.com")
                    );
                }
                Some(h)
            }
            None => None,
        };

        let tls = resolve_tls(layer, hostname.as_deref(), files)?;

        let flag = |key: &str| -> Result<bool, UserError> {
            match s(key) {
                Some(v) => match v.text.trim() {
                    "true" => Ok(true),
                    "false" => Ok(false),
                    other => Err(bad(key, v, format!("'{other}' is not true or false")).hint("use true or false")),
                },
                None => Ok(false),
            }
        };
        let allow_any = flag("allow-ssh-from-anywhere")?;
        let ssh_cidr = match s("ssh-cidr") {
            Some(v) => Some(validate_cidr("ssh-cidr", v, allow_any)?),
            None => None,
        };
        let allow_plain_http_from_anywhere = flag("allow-plain-http-from-anywhere")?;
        let allow_undersized = flag("allow-undersized")?;
        let web_cidr = match s("web-cidr") {
            // Opening the site to everyone is what --web-cidr 0.0.0.0/0 says; plain HTTP to
            // everyone needs its own flag below.
            Some(v) => Some(validate_cidr("web-cidr", v, true)?),
            None => None,
        };
        if let (Some(v), Some(c)) = (s("web-cidr"), web_cidr) {
            if c.prefix_len() == 0 && tls == Tls::None && !allow_plain_http_from_anywhere {
                return Err(bad("web-cidr", v, format!("{c} with tls = none serves Sourcegraph over plain HTTP to the whole internet"))
                    .hint("set up TLS (--tls letsencrypt --hostname H --tls-email E, or --tls custom), or pass --allow-plain-http-from-anywhere if you really mean it"));
            }
        }
        if cloud == Cloud::Aws && name.starts_with("sg-") {
            let v = s("name").expect("a name starting with sg- was given");
            return Err(bad("name", v, format!("'{name}' starts with sg-, which AWS reserves for security group ids"))
                .hint("pick a name that does not start with sg-"));
        }

        let local = resolve_local(layer, cloud)?;
        let aws = resolve_aws(layer, cloud)?;
        let (compose_override, compose_override_text) = match (files, s("compose-override")) {
            (UserFiles::Read, _) => {
                resolve_compose_override(layer, catalog().get(version).expect("resolved above"))?.map_or((None, None), |(p, t)| (Some(p), Some(t)))
            }
            (UserFiles::Recorded, v) => (v.map(|v| PathBuf::from(v.text.trim())), None),
        };

        Ok(Settings {
            local,
            aws,
            name,
            cloud,
            region,
            zone,
            size,
            instance_type,
            data_disk_gb,
            version,
            registry_mirror,
            mirror_mode,
            hostname,
            tls,
            ssh_cidr,
            allow_ssh_from_anywhere: allow_any,
            web_cidr,
            allow_plain_http_from_anywhere,
            allow_undersized,
            compose_override,
            compose_override_text,
        })
    }

    /// Legal but unwise choices, said once on stderr.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.cloud == Cloud::Local {
            w.push("the local cloud is for evaluation: one QEMU VM on this machine, not a production deployment".into());
        } else if self.data_disk_gb < DEFAULT_CLOUD_DISK_GB {
            w.push(format!("a {} GB data disk is below the 250 GB Sourcegraph recommends; repositories and indexes may not fit", self.data_disk_gb));
        }
        if self.allow_ssh_from_anywhere && self.ssh_cidr.is_some_and(|c| c.prefix_len() == 0) {
            w.push("SSH is open to the whole internet (--allow-ssh-from-anywhere)".into());
        }
        if self.cloud != Cloud::Local && self.web_cidr().is_some_and(|c| c.prefix_len() == 0) && self.tls == Tls::None {
            w.push("Sourcegraph is served over plain HTTP to the whole internet (--allow-plain-http-from-anywhere)".into());
        }
        if self.cloud != Cloud::Local && self.machine().vcpus.is_none() && !self.allow_undersized {
            w.push(format!(
                "{} is not in sgbox's size table: `up` asks the cloud for its vCPUs and memory, and refuses it below 8 vCPU / 32 GiB (--allow-undersized accepts it)",
                self.machine().instance_type
            ));
        }
        if self.allow_undersized {
            w.push("--allow-undersized: the machine may be below Sourcegraph's minimum of 8 vCPU and 32 GiB".into());
        }
        w
    }

    /// Who may reach HTTP(S): the web CIDR, else the SSH CIDR (a new site is claimed by its first
    /// visitor, so it is never open to the world unless the user says so).
    pub fn web_cidr(&self) -> Option<IpNet> {
        self.web_cidr.or(self.ssh_cidr)
    }

    /// The catalog release `version` resolved to (resolution already checked it exists).
    pub fn release(&self) -> &'static crate::release::catalog::Release {
        catalog().get(self.version).expect("settings hold only catalog versions")
    }

    /// The machine this deployment runs on.
    pub fn machine(&self) -> MachineType {
        let chosen = match (&self.instance_type, self.cloud) {
            (Some(t), _) => t.clone(),
            (None, Cloud::Aws) => self.size.tier().aws.to_string(),
            (None, Cloud::Gcp) => self.size.tier().gcp.to_string(),
            (None, Cloud::Local) => sizing::LOCAL_DEFAULT.to_string(),
        };
        let spec = sizing::parse_local_type(&chosen).or_else(|| sizing::known_type(&chosen));
        MachineType { instance_type: chosen, vcpus: spec.map(|s| s.0), memory_gib: spec.map(|s| s.1) }
    }

    /// The resolved settings as a sgbox.toml that `-f` reads back unchanged.
    pub fn to_toml(&self) -> String {
        let t = self.table();
        // Keys print in the table's order, which is the order of --help.
        let mut out = String::from("# sgbox deployment settings (resolved). Use with: sgbox -f sgbox.toml <command>\n");
        for key in KEYS {
            if let Some(v) = t.get(key.name) {
                out.push_str(&format!("{} = {}\n", key.name, v));
            }
        }
        out
    }

    /// Each set key's canonical value.
    fn table(&self) -> toml::Table {
        let mut t = toml::Table::new();
        let mut put = |k: &str, v: toml::Value| {
            t.insert(k.to_string(), v);
        };
        let st = |s: &str| toml::Value::String(s.to_string());
        put("name", st(&self.name));
        put("cloud", st(&self.cloud.to_string()));
        if let Some(r) = &self.region {
            put("region", st(r));
        }
        if let Some(z) = &self.zone {
            put("zone", st(z));
        }
        put("size", st(&self.size.to_string()));
        if let Some(i) = &self.instance_type {
            put("instance-type", st(i));
        }
        put("data-disk-gb", toml::Value::Integer(self.data_disk_gb.into()));
        put("version", st(&self.version.to_string()));
        if let Some(m) = &self.registry_mirror {
            put("registry-mirror", st(&m.to_string()));
            put(
                "mirror-mode",
                st(match self.mirror_mode {
                    MirrorMode::Digest => "digest",
                    MirrorMode::TagsOnly => "tags-only",
                }),
            );
        }
        if let Some(h) = &self.hostname {
            put("hostname", st(h));
        }
        match &self.tls {
            Tls::None => put("tls", st("none")),
            Tls::Letsencrypt { email } => {
                put("tls", st("letsencrypt"));
                put("tls-email", st(email));
            }
            Tls::Custom { cert, key } => {
                put("tls", st("custom"));
                put("tls-cert", st(&cert.display().to_string()));
                put("tls-key", st(&key.display().to_string()));
            }
        }
        if let Some(c) = &self.ssh_cidr {
            put("ssh-cidr", st(&c.to_string()));
        }
        if self.allow_ssh_from_anywhere {
            put("allow-ssh-from-anywhere", toml::Value::Boolean(true));
        }
        if let Some(c) = &self.web_cidr {
            put("web-cidr", st(&c.to_string()));
        }
        if self.allow_plain_http_from_anywhere {
            put("allow-plain-http-from-anywhere", toml::Value::Boolean(true));
        }
        if self.allow_undersized {
            put("allow-undersized", toml::Value::Boolean(true));
        }
        if let Some(p) = &self.compose_override {
            put("compose-override", st(&p.display().to_string()));
        }
        if let Some(i) = &self.aws.image_id {
            put("image-id", st(i));
        }
        if let Some(i) = &self.aws.subnet_id {
            put("subnet-id", st(i));
        }
        if let Some(b) = &self.local.base_image {
            put("base-image", st(&b.display().to_string()));
        }
        if self.local.accel != Accel::Auto {
            put("accel", st(&self.local.accel.to_string()));
        }
        for (k, p) in [("ssh-port", self.local.ssh_port), ("http-port", self.local.http_port), ("https-port", self.local.https_port)] {
            if let Some(p) = p {
                put(k, toml::Value::Integer(p.into()));
            }
        }
        t
    }

    /// The settings of an existing deployment. Its record is the truth for every command that
    /// acts on it: what this run was given (`given`: flags > SGBOX_* > -f file) may select the
    /// deployment (`name`), but never changes it. A flag that contradicts the record is an error
    /// naming the recorded value; an SGBOX_* variable or a file key that does is ignored, and
    /// said so in the returned warnings (the same sgbox.toml is often passed to every command).
    pub fn recorded(record: &str, record_path: &Path, given: &Layer) -> Result<(Settings, Vec<String>), UserError> {
        // The user's files were read when the box was made (the override went onto it, and is
        // the user's there since): they are neither read again nor needed.
        let recorded = Layer::parse_toml(record, record_path)?;
        let kept = Settings::resolve_with(&recorded, UserFiles::Recorded)?;
        let kept_table = kept.table();
        let mut warnings = Vec::new();
        for (key, v) in given.entries() {
            if key == "name" || key == "compose-override" {
                continue;
            }
            // The value as this run would have resolved it, next to the recorded ones.
            let one = Layer::single(key, v.clone()).over(recorded.clone());
            let same = match Settings::resolve_with(&one, UserFiles::Recorded) {
                Ok(s) => s.table().get(key) == kept_table.get(key),
                Err(_) => false,
            };
            if same {
                continue;
            }
            let recorded = kept_table.get(key).map(|x| format!("{key} = {x}")).unwrap_or_else(|| format!("no {key}"));
            match v.source {
                Source::Flag => {
                    return Err(UserError::field(
                        format!("--{key}"),
                        format!("the deployment \"{}\" was created with {recorded} (its record: {})", kept.name, record_path.display()),
                    )
                    .hint(format!(
                        "drop --{key}: commands on an existing deployment use its recorded settings (to change them, `sgbox upgrade` for the release, or `sgbox down` and `up` again)"
                    )))
                }
                _ => warnings.push(format!(
                    "{} is ignored: the deployment \"{}\" was created with {recorded}, and its record applies",
                    layer::field_name(key, v),
                    kept.name
                )),
            }
        }
        Ok((kept, warnings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(pairs: &[(&'static str, &str)]) -> Layer {
        Layer::from_flags(pairs.iter().map(|(k, v)| (*k, Some(v.to_string()))))
    }

    fn resolve(pairs: &[(&'static str, &str)]) -> Result<Settings, UserError> {
        Settings::resolve(&layer(pairs))
    }

    #[test]
    fn defaults_and_machine() {
        let s = resolve(&[("cloud", "aws")]).unwrap();
        assert_eq!(s.name, "sourcegraph");
        assert_eq!(s.size, Size::XS);
        assert_eq!(s.data_disk_gb, 250);
        assert_eq!(s.version, catalog().latest().version);
        assert_eq!(s.machine().instance_type, "m6a.2xlarge");
        let s = resolve(&[("cloud", "gcp"), ("size", "l")]).unwrap();
        assert_eq!(s.machine().instance_type, "n2-standard-48");
        let s = resolve(&[("cloud", "local")]).unwrap();
        assert_eq!(s.machine(), MachineType { instance_type: "local-2x4".into(), vcpus: Some(2), memory_gib: Some(4) });
        assert_eq!(s.data_disk_gb, 20);
    }

    #[test]
    fn precedence_flag_env_file() {
        let flags = layer(&[("size", "M")]);
        let env = Layer::from_env(|k| match k {
            "SGBOX_SIZE" => Some("S".into()),
            "SGBOX_CLOUD" => Some("gcp".into()),
            _ => None,
        });
        let file = Layer::parse_toml("cloud = \"aws\"\nsize = \"XL\"\nname = \"from-file\"\n", Path::new("sgbox.toml")).unwrap();
        let s = Settings::resolve(&flags.over(env).over(file)).unwrap();
        assert_eq!(s.size, Size::M);
        assert_eq!(s.cloud, Cloud::Gcp);
        assert_eq!(s.name, "from-file");
    }

    #[test]
    fn toml_round_trip() {
        let s = resolve(&[
            ("cloud", "aws"),
            ("region", "eu-west-1"),
            ("zone", "eu-west-1b"),
            ("size", "S"),
            ("version", "7.4"),
            ("registry-mirror", "http://10.0.2.2:5000/sg"),
            ("mirror-mode", "tags-only"),
            ("hostname", "sg.example.com"),
            ("tls", "letsencrypt"),
            ("tls-email", "ops@example.com"),
            ("ssh-cidr", "203.0.113.0/24"),
            ("data-disk-gb", "500"),
        ])
        .unwrap();
        let text = s.to_toml();
        let again = Settings::resolve(&Layer::parse_toml(&text, Path::new("x.toml")).unwrap()).unwrap();
        assert_eq!(again.to_toml(), text);
        assert!(text.contains("version = \"7.4.0\""), "{text}");
    }

    #[test]
    fn bad_values_name_the_field() {
        #[allow(clippy::type_complexity)]
        let cases: &[(&[(&'static str, &str)], &str, &str)] = &[
            (&[("cloud", "azure")], "--cloud", "aws, gcp or local"),
            (&[("cloud", "aws"), ("size", "XXL")], "--size", "XS, S, M, L, XL"),
            (&[("cloud", "aws"), ("region", "us-est-1")], "--region", "us-east-1"),
            (&[("cloud", "aws"), ("version", "7.5.1")], "--version", "7.5.4453"),
            (&[("cloud", "aws"), ("version", "seven")], "--version", "latest"),
            (&[("cloud", "aws"), ("ssh-cidr", "10.0.0.0/33")], "--ssh-cidr", "203.0.113.7/32"),
            (&[("cloud", "aws"), ("ssh-cidr", "10.0.0.5/24")], "--ssh-cidr", "10.0.0.0/24"),
            (&[("cloud", "aws"), ("ssh-cidr", "0.0.0.0/0")], "--ssh-cidr", "--allow-ssh-from-anywhere"),
            (&[("cloud", "aws"), ("ssh-cidr", "203.0.113.7"), ("web-cidr", "0.0.0.0/0")], "--web-cidr", "--allow-plain-http-from-anywhere"),
            (&[("cloud", "aws"), ("web-cidr", "10.0.0.1/8")], "--web-cidr", "10.0.0.0/8"),
            (&[("cloud", "aws"), ("name", "sg-box")], "--name", "sg-"),
            (
                &[("cloud", "aws"), ("tls", "letsencrypt"), ("hostname", "a.example.com"), ("tls-email", "a}\nadmin off@x.com")],
                "--tls-email",
                "admin@example.com",
            ),
            (&[("cloud", "aws"), ("hostname", "bad_host!")], "--hostname", "sourcegraph.example.com"),
            (&[("cloud", "aws"), ("instance-type", "m6a.large")], "--instance-type", "m6a.2xlarge"),
            (&[("cloud", "aws"), ("instance-type", "n2-standard-8")], "--instance-type", "m6a.2xlarge"),
            (&[("cloud", "aws"), ("tls", "letsencrypt")], "hostname", "--hostname"),
            (&[("cloud", "aws"), ("tls", "letsencrypt"), ("hostname", "a.example.com")], "tls-email", "--tls-email"),
            (&[("cloud", "aws"), ("tls-email", "a@b.com")], "--tls-email", "remove"),
            (&[("cloud", "local"), ("region", "us-east-1")], "--region", "remove region"),
            (&[("cloud", "aws"), ("data-disk-gb", "lots")], "--data-disk-gb", "500"),
            (&[("cloud", "aws"), ("registry-mirror", "reg:99999")], "--registry-mirror", "HOST[:PORT]"),
            (&[("cloud", "aws"), ("mirror-mode", "tags-only")], "--mirror-mode", "registry-mirror"),
            (&[("name", "Bad Name"), ("cloud", "aws")], "--name", "lowercase"),
            (&[("cloud", "local"), ("ssh-port", "2222"), ("http-port", "2222")], "--http-port", "ssh-port already"),
            (&[("cloud", "local"), ("http-port", "8080"), ("https-port", "8080")], "--https-port", "http-port already"),
            (&[("cloud", "local"), ("ssh-port", "2222"), ("https-port", "2222")], "--https-port", "ssh-port already"),
        ];
        for (pairs, field, hint) in cases {
            let e = resolve(pairs).expect_err(&format!("{pairs:?} should fail"));
            assert_eq!(e.field.as_deref(), Some(*field), "{pairs:?}: {e}");
            assert!(e.to_string().contains(hint), "{pairs:?}: {e}");
        }
        assert!(resolve(&[("cloud", "aws"), ("ssh-cidr", "0.0.0.0/0"), ("allow-ssh-from-anywhere", "true")]).is_ok());
        assert_eq!(resolve(&[("cloud", "aws"), ("ssh-cidr", "198.51.100.4")]).unwrap().ssh_cidr.unwrap().to_string(), "198.51.100.4/32");
    }

    #[test]
    fn a_compose_override_is_checked_before_a_box_is_made_and_only_then() {
        let dir = std::env::temp_dir().join(format!("sgbox-override-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| -> String {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let good = "services:\n  gitserver-0:\n    mem_limit: '16g'\n  my-exporter:\n    image: prom/node-exporter:v1.8.2\nx-note: mine\n";
        let ok = file("ok.yaml", good);
        let s = resolve(&[("cloud", "local"), ("version", "5.9"), ("compose-override", &ok)]).unwrap();
        assert_eq!(s.compose_override_text.as_deref(), Some(good));
        assert_eq!(s.compose_override.as_deref(), Some(std::fs::canonicalize(&ok).unwrap().as_path()));
        // An empty `services:` (the file sgbox itself writes) is an override too.
        assert!(resolve(&[("cloud", "local"), ("compose-override", &file("empty.yaml", "services: {}\n"))]).is_ok());

        #[allow(clippy::type_complexity)]
        let cases: &[(&str, &str, &str, &str)] = &[
            ("typo.yaml", "services:\n  gitserver:\n    mem_limit: 1g\n", "service \"gitserver\" is not one of Sourcegraph", "gitserver-0"),
            // syntactic-code-intel-worker came with 6.x: 5.9's compose file has no such service.
            ("newer.yaml", "services:\n  syntactic-code-intel-worker:\n    mem_limit: 1g\n", "is not one of Sourcegraph 5.9", "docker-compose.yaml"),
            ("bad.yaml", "services:\n  gitserver-0: [\n", "is not YAML", "fix the YAML"),
            ("list.yaml", "- services\n", "is not a mapping of Compose keys", "services:"),
            ("name.yaml", "name: other\nservices: {}\n", "project's name", "remove the top-level `name:`"),
            ("key.yaml", "service:\n  gitserver-0: {}\n", "`service` in", "services:"),
            ("two.yaml", "services: {}\n---\nservices: {}\n", "2 YAML documents", "services:"),
            ("blank.yaml", "", "is empty", "services:"),
        ];
        for (name, text, msg, hint) in cases {
            let p = file(name, text);
            let e = resolve(&[("cloud", "local"), ("version", "5.9"), ("compose-override", &p)]).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("--compose-override"), "{name}: {e}");
            assert!(e.message.contains(msg) && e.hint.as_deref().unwrap_or("").contains(hint), "{name}: {e:?}");
        }
        let e = resolve(&[("cloud", "local"), ("compose-override", &dir.join("missing.yaml").display().to_string())]).unwrap_err();
        assert!(e.field.as_deref() == Some("--compose-override") && e.message.contains("cannot read"), "{e:?}");
        let e =
            resolve(&[("cloud", "local"), ("compose-override", &file("big.yaml", &format!("services: {{}}\n#{}\n", "x".repeat(9000))))]).unwrap_err();
        assert!(e.message.contains("at most 8192"), "{e:?}");

        // The record keeps where the user's files came from; commands on the box (`down` too)
        // never read them again, so a file moved since changes nothing.
        let (cert, key) = (file("c.pem", "-----BEGIN CERTIFICATE-----\n"), file("k.pem", "-----BEGIN PRIVATE KEY-----\n"));
        let s = resolve(&[
            ("cloud", "local"),
            ("version", "5.9"),
            ("compose-override", &ok),
            ("hostname", "sg.example.com"),
            ("tls", "custom"),
            ("tls-cert", &cert),
            ("tls-key", &key),
        ])
        .unwrap();
        let text = s.to_toml();
        assert!(text.contains(&format!("compose-override = \"{}\"", s.compose_override.as_ref().unwrap().display())), "{text}");
        for f in [&ok, &cert, &key] {
            std::fs::remove_file(f).unwrap();
        }
        assert!(resolve(&[("cloud", "local"), ("compose-override", &ok)]).is_err(), "a new box needs the file");
        let given = Layer::parse_toml(&format!("compose-override = \"{ok}\"\n"), Path::new("sgbox.toml")).unwrap();
        let (kept, warnings) = Settings::recorded(&text, Path::new("deployment.json"), &given).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(kept.to_toml(), text, "the record as it was, without its files");
        assert!(kept.compose_override_text.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_cloud_without_a_terminal() {
        let e = resolve(&[]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("cloud"));
        assert!(e.to_string().contains("--cloud"));
    }

    #[test]
    fn toml_errors_have_positions_and_suggestions() {
        let e = Layer::parse_toml("cloud = \"aws\"\nsise = \"S\"\n", Path::new("sgbox.toml")).unwrap_err();
        assert!(e.to_string().contains("sgbox.toml:2") && e.to_string().contains("did you mean `size`"), "{e}");
        let e = Layer::parse_toml("cloud = \"aws\"\nsize = S\n", Path::new("sgbox.toml")).unwrap_err();
        assert!(e.to_string().contains("sgbox.toml:2:8"), "{e}");
        let e = Layer::parse_toml("data-disk-gb = \"big\"\n", Path::new("sgbox.toml")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("data-disk-gb"));
    }

    #[test]
    fn a_deployments_record_is_the_truth_for_commands_on_it() {
        let rec = resolve(&[("cloud", "local"), ("name", "demo"), ("size", "S"), ("version", "7.4")]).unwrap().to_toml();
        let at = Path::new("/state/demo/deployment.json");
        // An SGBOX_* variable or a file key that differs is ignored, and said so.
        let env = Layer::from_env(|k| match k {
            "SGBOX_VERSION" => Some("7.5".into()),
            "SGBOX_CLOUD" => Some("aws".into()),
            "SGBOX_NAME" => Some("demo".into()),
            _ => None,
        });
        let file = Layer::parse_toml("size = \"XL\"\n", Path::new("sgbox.toml")).unwrap();
        let (s, warnings) = Settings::recorded(&rec, at, &env.over(file)).unwrap();
        assert_eq!((s.cloud, s.size, s.version.to_string().as_str()), (Cloud::Local, Size::S, "7.4.0"));
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("SGBOX_VERSION is ignored") && w.contains("version = \"7.4.0\"")), "{warnings:?}");
        assert!(warnings.iter().any(|w| w.starts_with("size is ignored")), "{warnings:?}");
        // A flag that contradicts the record is an error naming the recorded value.
        let e = Settings::recorded(&rec, at, &layer(&[("cloud", "aws")])).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("--cloud"));
        assert!(e.to_string().contains("cloud = \"local\"") && e.to_string().contains("drop --cloud"), "{e}");
        let e = Settings::recorded(&rec, at, &layer(&[("region", "us-east-1")])).unwrap_err();
        assert!(e.to_string().contains("no region"), "{e}");
        // The same value, however written, is no conflict.
        let (_, warnings) = Settings::recorded(&rec, at, &layer(&[("cloud", "LOCAL"), ("name", "demo")])).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn file_values_report_their_line() {
        let file = Layer::parse_toml("cloud = \"aws\"\n\nsize = \"huge\"\n", Path::new("my.toml")).unwrap();
        let e = Settings::resolve(&file).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("size"));
        assert!(e.to_string().contains("my.toml:3"), "{e}");
    }
}
