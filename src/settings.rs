//! Deployment settings: one table of keys, resolved from flags > environment (`SGBOX_…`) >
//! `sgbox.toml` > an interactive prompt > defaults, then validated into [`Settings`].
//!
//! The config file is the flags, serialized: every key is a long flag of the same name, and
//! [`Settings::to_toml`] prints a file that `-f` accepts unchanged. Validation names the field,
//! where the value came from, and how to fix it.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, IsTerminal, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::IpNet;
use serde::Serialize;

use crate::catalog::catalog;
use crate::error::UserError;
use crate::sizing::{self, Machine, Size};
use crate::version::{Version, VersionSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Bool,
}

struct Key {
    name: &'static str,
    kind: Kind,
}

/// Every setting, in the order `to_toml` prints them. The names are the long flags.
const KEYS: &[Key] = &[
    Key { name: "name", kind: Kind::Str },
    Key { name: "cloud", kind: Kind::Str },
    Key { name: "region", kind: Kind::Str },
    Key { name: "zone", kind: Kind::Str },
    Key { name: "size", kind: Kind::Str },
    Key { name: "instance-type", kind: Kind::Str },
    Key { name: "data-disk-gb", kind: Kind::Int },
    Key { name: "version", kind: Kind::Str },
    Key { name: "registry-mirror", kind: Kind::Str },
    Key { name: "mirror-mode", kind: Kind::Str },
    Key { name: "hostname", kind: Kind::Str },
    Key { name: "tls", kind: Kind::Str },
    Key { name: "tls-email", kind: Kind::Str },
    Key { name: "tls-cert", kind: Kind::Str },
    Key { name: "tls-key", kind: Kind::Str },
    Key { name: "ssh-cidr", kind: Kind::Str },
    Key { name: "allow-ssh-from-anywhere", kind: Kind::Bool },
    Key { name: "image-id", kind: Kind::Str },
    Key { name: "subnet-id", kind: Kind::Str },
    Key { name: "base-image", kind: Kind::Str },
    Key { name: "accel", kind: Kind::Str },
    Key { name: "ssh-port", kind: Kind::Int },
    Key { name: "http-port", kind: Kind::Int },
    Key { name: "https-port", kind: Kind::Int },
];

pub fn env_var(key: &str) -> String {
    format!("SGBOX_{}", key.to_ascii_uppercase().replace('-', "_"))
}

/// Where a value came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    File { path: PathBuf, line: usize },
    Prompt,
}

#[derive(Clone, Debug)]
struct Value {
    text: String,
    source: Source,
}

/// Unvalidated values of one layer, keyed by setting name.
#[derive(Clone, Debug, Default)]
pub struct Layer(BTreeMap<&'static str, Value>);

fn key_named(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

impl Layer {
    /// Values given as flags. `None` entries are flags not given.
    pub fn from_flags<'a>(flags: impl IntoIterator<Item = (&'a str, Option<String>)>) -> Layer {
        let mut l = Layer::default();
        for (name, v) in flags {
            let key = key_named(name).unwrap_or_else(|| panic!("flag {name} has no settings key"));
            if let Some(text) = v {
                l.0.insert(key.name, Value { text, source: Source::Flag });
            }
        }
        l
    }

    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Layer {
        let mut l = Layer::default();
        for key in KEYS {
            if let Some(text) = get(&env_var(key.name)) {
                l.0.insert(key.name, Value { text, source: Source::Env });
            }
        }
        l
    }

    pub fn from_file(path: &Path) -> Result<Layer, UserError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            UserError::field("config", format!("cannot read {}: {e}", path.display()))
                .hint("pass -f with the path of an existing sgbox.toml")
        })?;
        Layer::parse_toml(&text, path)
    }

    pub fn parse_toml(text: &str, path: &Path) -> Result<Layer, UserError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            UserError::field("config", format!("{}:{line}:{col}: {}", path.display(), e.message().trim()))
                .hint("fix the TOML syntax at that position (strings need quotes, one key = value per line)")
        })?;
        let mut l = Layer::default();
        for (name, value) in table {
            let line = find_key_line(text, &name);
            let at = format!("{}:{line}", path.display());
            let Some(key) = key_named(&name) else {
                let mut err = UserError::field("config", format!("{at}: unknown key `{name}`"));
                err = match did_you_mean(&name) {
                    Some(s) => err.hint(format!("did you mean `{s}`?")),
                    None => err.hint(format!("known keys: {}", KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", "))),
                };
                return Err(err);
            };
            let text = match (key.kind, &value) {
                (Kind::Str, toml::Value::String(s)) => s.clone(),
                (Kind::Int, toml::Value::Integer(i)) => i.to_string(),
                (Kind::Bool, toml::Value::Boolean(b)) => b.to_string(),
                (kind, other) => {
                    let want = match kind {
                        Kind::Str => "a string in quotes",
                        Kind::Int => "a whole number",
                        Kind::Bool => "true or false",
                    };
                    return Err(UserError::field(key.name, format!("{at}: expected {want}, found {}", other.type_str()))
                        .hint(format!("write it as {} = {}", key.name, example(kind))));
                }
            };
            l.0.insert(key.name, Value { text, source: Source::File { path: path.to_path_buf(), line } });
        }
        Ok(l)
    }

    /// This layer with the gaps filled from `lower`.
    pub fn over(mut self, lower: Layer) -> Layer {
        for (k, v) in lower.0 {
            self.0.entry(k).or_insert(v);
        }
        self
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// The raw text given for `key`, if any layer gave it.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.text.as_str())
    }
}

fn example(kind: Kind) -> &'static str {
    match kind {
        Kind::Str => "\"value\"",
        Kind::Int => "250",
        Kind::Bool => "true",
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

fn find_key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let t = l.trim_start();
            let t = t.strip_prefix('"').unwrap_or(t);
            t.starts_with(key) && t[key.len()..].trim_start().trim_start_matches('"').trim_start().starts_with('=')
        })
        .map(|i| i + 1)
        .unwrap_or(1)
}

fn did_you_mean(name: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|k| (strsim::jaro_winkler(name, k.name), k.name))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| n)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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
        let (insecure, rest) = if let Some(r) = s.strip_prefix("http://") {
            (true, r)
        } else {
            (false, s.strip_prefix("https://").unwrap_or(s))
        };
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

pub const DEFAULT_NAME: &str = "sourcegraph";
pub const DEFAULT_CLOUD_DISK_GB: u32 = 250;
pub const DEFAULT_LOCAL_DISK_GB: u32 = 20;

/// How to fill a setting nobody gave.
pub struct Prompter {
    pub interactive: bool,
}

impl Prompter {
    fn ask(&self, question: &str) -> Option<String> {
        if !self.interactive {
            return None;
        }
        let mut err = std::io::stderr();
        let _ = write!(err, "{question} ");
        let _ = err.flush();
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).ok()?;
        let t = line.trim();
        (!t.is_empty()).then(|| t.to_string())
    }

    /// Prompts only when stdin is a terminal, `--yes` is absent and output is for people.
    pub fn detect(yes: bool, json: bool) -> Prompter {
        Prompter { interactive: !yes && !json && std::io::stdin().is_terminal() }
    }
}

fn src_note(v: &Value) -> String {
    match &v.source {
        Source::Flag => String::new(),
        Source::Env => String::new(),
        Source::File { path, line } => format!(" (in {}:{line})", path.display()),
        Source::Prompt => " (answered at the prompt)".into(),
    }
}

/// The name a user would change: `--size`, `SGBOX_SIZE` or the file key.
fn field_name(key: &str, v: &Value) -> String {
    match v.source {
        Source::Flag => format!("--{key}"),
        Source::Env => env_var(key),
        _ => key.to_string(),
    }
}

fn bad(key: &str, v: &Value, msg: impl fmt::Display) -> UserError {
    UserError::field(field_name(key, v), format!("{msg}{}", src_note(v)))
}

/// An error from a shared parser, re-labelled with the field and where its value came from.
fn relabel(e: UserError, key: &str, v: &Value) -> UserError {
    UserError { hint: e.hint, ..bad(key, v, e.message) }
}

impl Settings {
    /// Validate a merged layer. Every value is checked; the first problem is reported.
    pub fn resolve(layer: &Layer, prompter: &Prompter) -> Result<Settings, UserError> {
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
            None => match prompter.ask("Which cloud should the box run on? [aws/gcp/local]:") {
                Some(text) => Value { text, source: Source::Prompt },
                None => {
                    return Err(UserError::field("cloud", "no cloud given")
                        .hint("pass --cloud aws|gcp|local, set SGBOX_CLOUD, or add `cloud = \"aws\"` to sgbox.toml"))
                }
            },
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
                let n: u32 = v.text.trim().parse().map_err(|_| {
                    bad("data-disk-gb", v, format!("'{}' is not a whole number of GB", v.text)).hint("e.g. data-disk-gb = 500")
                })?;
                if !(10..=16_384).contains(&n) {
                    return Err(bad("data-disk-gb", v, format!("{n} GB is out of range")).hint("use 10 to 16384 GB; Sourcegraph recommends at least 250 GB of SSD on clouds"));
                }
                n
            }
            None if cloud == Cloud::Local => DEFAULT_LOCAL_DISK_GB,
            None => DEFAULT_CLOUD_DISK_GB,
        };

        let version = match s("version") {
            Some(v) => {
                let spec: VersionSpec = v.text.parse().map_err(|e: crate::version::ParseSpecError| bad("version", v, e))?;
                catalog().resolve(spec).map_err(|e| relabel(e, "version", v))?.version
            }
            None => catalog().latest().version,
        };

        let registry_mirror = match s("registry-mirror") {
            Some(v) => Some(Mirror::parse(v.text.trim()).map_err(|m| {
                bad("registry-mirror", v, m).hint("use HOST[:PORT][/PREFIX], e.g. registry.example.com/sourcegraph; prefix http:// for a plain-HTTP registry")
            })?),
            None => None,
        };
        let mirror_mode = match s("mirror-mode") {
            Some(v) => match v.text.trim() {
                "digest" => MirrorMode::Digest,
                "tags-only" => MirrorMode::TagsOnly,
                other => return Err(bad("mirror-mode", v, format!("'{other}' is not a mirror mode")).hint("use digest (the mirror serves the official images) or tags-only (rebuilt images)")),
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
                    return Err(bad("hostname", v, format!("'{}' is not a valid host name", v.text)).hint("use a DNS name such as sourcegraph.example.com"));
                }
                Some(h)
            }
            None => None,
        };

        let tls = resolve_tls(layer, hostname.as_deref())?;

        let allow_any = match s("allow-ssh-from-anywhere") {
            Some(v) => match v.text.trim() {
                "true" => true,
                "false" => false,
                other => return Err(bad("allow-ssh-from-anywhere", v, format!("'{other}' is not true or false")).hint("use true or false")),
            },
            None => false,
        };
        let ssh_cidr = match s("ssh-cidr") {
            Some(v) => Some(validate_cidr(v, allow_any)?),
            None => None,
        };

        let local = resolve_local(layer, cloud)?;
        let aws = resolve_aws(layer, cloud)?;

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
        w
    }

    /// The catalog release `version` resolved to (resolution already checked it exists).
    pub fn release(&self) -> &'static crate::catalog::Release {
        catalog().get(self.version).expect("settings hold only catalog versions")
    }

    /// The machine this deployment runs on.
    pub fn machine(&self) -> Machine {
        let chosen = match (&self.instance_type, self.cloud) {
            (Some(t), _) => t.clone(),
            (None, Cloud::Aws) => self.size.tier().aws.to_string(),
            (None, Cloud::Gcp) => self.size.tier().gcp.to_string(),
            (None, Cloud::Local) => sizing::LOCAL_DEFAULT.to_string(),
        };
        let spec = sizing::parse_local_type(&chosen).or_else(|| sizing::known_type(&chosen));
        Machine { instance_type: chosen, vcpus: spec.map(|s| s.0), memory_gib: spec.map(|s| s.1) }
    }

    /// The resolved settings as a sgbox.toml that `-f` reads back unchanged.
    pub fn to_toml(&self) -> String {
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
            put("mirror-mode", st(match self.mirror_mode {
                MirrorMode::Digest => "digest",
                MirrorMode::TagsOnly => "tags-only",
            }));
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
        // Keys print in the table's order, which is the order of --help.
        let mut out = String::from("# sgbox deployment settings (resolved). Use with: sgbox -f sgbox.toml <command>\n");
        for key in KEYS {
            if let Some(v) = t.get(key.name) {
                out.push_str(&format!("{} = {}\n", key.name, v));
            }
        }
        out
    }
}

fn resolve_aws(layer: &Layer, cloud: Cloud) -> Result<AwsSettings, UserError> {
    let id = |key: &str, prefix: &str, example: &str| -> Result<Option<String>, UserError> {
        let Some(v) = layer.get(key) else { return Ok(None) };
        if cloud != Cloud::Aws {
            return Err(bad(key, v, format!("only applies to AWS, not {cloud}")).hint(format!("drop {}", field_name(key, v))));
        }
        let t = v.text.trim();
        let hex = t.strip_prefix(prefix).unwrap_or("");
        if !(8..=17).contains(&hex.len()) || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return Err(bad(key, v, format!("'{t}' is not an id of the form {prefix}…")).hint(format!("use an id such as {example}")));
        }
        Ok(Some(t.to_string()))
    };
    Ok(AwsSettings { image_id: id("image-id", "ami-", "ami-0abcdef1234567890")?, subnet_id: id("subnet-id", "subnet-", "subnet-0abcdef1234567890")? })
}

fn resolve_local(layer: &Layer, cloud: Cloud) -> Result<LocalSettings, UserError> {
    let local_keys = ["base-image", "accel", "ssh-port", "http-port", "https-port"];
    if cloud != Cloud::Local {
        if let Some((k, v)) = local_keys.iter().find_map(|k| layer.get(k).map(|v| (*k, v))) {
            return Err(bad(k, v, format!("only applies to the local cloud, not {cloud}")).hint(format!("drop {}", field_name(k, v))));
        }
        return Ok(LocalSettings::default());
    }
    let base_image = match layer.get("base-image") {
        Some(v) => {
            let p = PathBuf::from(v.text.trim());
            if !p.exists() {
                return Err(bad("base-image", v, format!("{} does not exist", p.display())).hint(
                    "give a Debian 13 cloud image (qcow2) or the folder `sgbox image build --cloud local` wrote, or omit it to use the default image",
                ));
            }
            // Absolute, so the recorded settings work from any directory.
            Some(std::fs::canonicalize(&p).unwrap_or(p))
        }
        None => None,
    };
    let accel = match layer.get("accel") {
        Some(v) => match v.text.trim() {
            "auto" => Accel::Auto,
            "kvm" => Accel::Kvm,
            "tcg" => Accel::Tcg,
            other => return Err(bad("accel", v, format!("'{other}' is not an accelerator")).hint("use auto (probe KVM, fall back to TCG), kvm or tcg")),
        },
        None => Accel::Auto,
    };
    let port = |k: &str| -> Result<Option<u16>, UserError> {
        match layer.get(k) {
            Some(v) => match v.text.trim().parse::<u16>() {
                Ok(0) => Ok(None),
                Ok(p) if p >= 1024 => Ok(Some(p)),
                _ => Err(bad(k, v, format!("'{}' is not a port from 1024 to 65535", v.text)).hint("pick a free unprivileged port, or 0 / omit it to pick one automatically")),
            },
            None => Ok(None),
        }
    };
    let (ssh_port, http_port, https_port) = (port("ssh-port")?, port("http-port")?, port("https-port")?);
    let ports: Vec<u16> = [ssh_port, http_port, https_port].into_iter().flatten().collect();
    if let Some(dup) = ports.iter().find(|p| ports.iter().filter(|q| q == p).count() > 1) {
        let v = layer.get("https-port").or(layer.get("http-port")).or(layer.get("ssh-port")).expect("a port was given");
        return Err(bad("ssh-port", v, format!("port {dup} is given twice")).hint("give ssh-port, http-port and https-port different values"));
    }
    Ok(LocalSettings { base_image, accel, ssh_port, http_port, https_port })
}

fn resolve_tls(layer: &Layer, hostname: Option<&str>) -> Result<Tls, UserError> {
    let mode = layer.get("tls");
    let email = layer.get("tls-email");
    let cert = layer.get("tls-cert");
    let key = layer.get("tls-key");
    let mode_text = mode.map(|v| v.text.trim().to_ascii_lowercase()).unwrap_or_else(|| "none".into());
    let need_host = |v: Option<&Value>| -> Result<(), UserError> {
        match hostname {
            Some(h) if h.contains('.') && h.parse::<IpAddr>().is_err() => Ok(()),
            _ => Err(UserError::field("hostname", format!("TLS mode {mode_text}{} needs a DNS host name", v.map(src_note).unwrap_or_default()))
                .hint("set hostname to the name that points at the box, e.g. --hostname sourcegraph.example.com")),
        }
    };
    let stray = |v: Option<&Value>, k: &str| -> Result<(), UserError> {
        match v {
            Some(v) => Err(bad(k, v, format!("does not apply with tls = {mode_text}")).hint(format!("remove {k}, or choose the TLS mode it belongs to"))),
            None => Ok(()),
        }
    };
    match mode_text.as_str() {
        "none" => {
            stray(email, "tls-email")?;
            stray(cert, "tls-cert")?;
            stray(key, "tls-key")?;
            Ok(Tls::None)
        }
        "letsencrypt" => {
            need_host(mode)?;
            stray(cert, "tls-cert")?;
            stray(key, "tls-key")?;
            let Some(e) = email else {
                return Err(UserError::field("tls-email", "Let's Encrypt needs a contact email").hint("pass --tls-email admin@example.com"));
            };
            let addr = e.text.trim();
            let ok = addr.split_once('@').is_some_and(|(u, d)| !u.is_empty() && is_hostname(d) && d.contains('.'));
            if !ok {
                return Err(bad("tls-email", e, format!("'{addr}' is not an email address")).hint("use an address such as admin@example.com"));
            }
            Ok(Tls::Letsencrypt { email: addr.to_string() })
        }
        "custom" => {
            need_host(mode)?;
            stray(email, "tls-email")?;
            let file = |v: Option<&Value>, k: &str, what: &str| -> Result<PathBuf, UserError> {
                let Some(v) = v else {
                    return Err(UserError::field(k, format!("custom TLS needs the {what}")).hint(format!("pass --{k} PATH to a PEM file")));
                };
                let p = PathBuf::from(v.text.trim());
                let text = std::fs::read_to_string(&p).map_err(|e| bad(k, v, format!("cannot read {}: {e}", p.display())).hint("give the path of a readable PEM file"))?;
                if !text.contains("-----BEGIN ") {
                    return Err(bad(k, v, format!("{} is not a PEM file", p.display())).hint(format!("give the {what} in PEM form (-----BEGIN …)")));
                }
                Ok(std::fs::canonicalize(&p).unwrap_or(p))
            };
            Ok(Tls::Custom { cert: file(cert, "tls-cert", "certificate chain")?, key: file(key, "tls-key", "private key")? })
        }
        other => Err(bad("tls", mode.expect("tls set when not defaulted"), format!("'{other}' is not a TLS mode")).hint("use none, letsencrypt or custom")),
    }
}

fn validate_cidr(v: &Value, allow_any: bool) -> Result<IpNet, UserError> {
    let t = v.text.trim();
    let net: IpNet = match t.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match t.parse::<IpAddr>() {
            // A bare address means that one host.
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(bad("ssh-cidr", v, format!("'{t}' is not a CIDR block")).hint("write an address and prefix length, e.g. 203.0.113.7/32"))
            }
        },
    };
    if net.trunc() != net {
        return Err(bad("ssh-cidr", v, format!("'{t}' has host bits set beyond /{}", net.prefix_len()))
            .hint(format!("did you mean {} (the network) or {}/{} (one host)?", net.trunc(), net.addr(), net.max_prefix_len())));
    }
    if net.prefix_len() == 0 && !allow_any {
        return Err(bad("ssh-cidr", v, format!("{t} opens SSH to the whole internet"))
            .hint("give your own address range (e.g. 203.0.113.7/32), or pass --allow-ssh-from-anywhere if you really mean it"));
    }
    Ok(net)
}

pub fn is_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && !h.rsplit('.').next().unwrap_or("").bytes().all(|b| b.is_ascii_digit())
}

fn is_deployment_name(n: &str) -> bool {
    let b = n.as_bytes();
    (2..=32).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !n.ends_with('-')
}

/// Regions where the size tiers' instance types are offered. A new region is one line here.
pub const AWS_REGIONS: &[&str] = &[
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "ca-central-1", "ca-west-1", "sa-east-1", "mx-central-1",
    "eu-west-1", "eu-west-2", "eu-west-3", "eu-central-1", "eu-central-2", "eu-north-1", "eu-south-1", "eu-south-2",
    "ap-south-1", "ap-south-2", "ap-southeast-1", "ap-southeast-2", "ap-southeast-3", "ap-southeast-4", "ap-southeast-5", "ap-southeast-7",
    "ap-northeast-1", "ap-northeast-2", "ap-northeast-3", "ap-east-1", "me-south-1", "me-central-1", "il-central-1", "af-south-1",
    "us-gov-east-1", "us-gov-west-1",
];

pub const GCP_REGIONS: &[&str] = &[
    "us-central1", "us-east1", "us-east4", "us-east5", "us-south1", "us-west1", "us-west2", "us-west3", "us-west4",
    "northamerica-northeast1", "northamerica-northeast2", "northamerica-south1", "southamerica-east1", "southamerica-west1",
    "europe-west1", "europe-west2", "europe-west3", "europe-west4", "europe-west6", "europe-west8", "europe-west9",
    "europe-west10", "europe-west12", "europe-north1", "europe-north2", "europe-central2", "europe-southwest1",
    "asia-east1", "asia-east2", "asia-northeast1", "asia-northeast2", "asia-northeast3", "asia-south1", "asia-south2",
    "asia-southeast1", "asia-southeast2", "australia-southeast1", "australia-southeast2", "me-central1", "me-central2",
    "me-west1", "africa-south1",
];

fn closest<'a>(s: &str, known: &[&'a str]) -> Option<&'a str> {
    known.iter().map(|k| (strsim::jaro_winkler(s, k), *k)).filter(|(sc, _)| *sc > 0.85).max_by(|a, b| a.0.total_cmp(&b.0)).map(|(_, k)| k)
}

fn validate_region(cloud: Cloud, v: &Value) -> Result<String, UserError> {
    let r = v.text.trim().to_ascii_lowercase();
    let known = match cloud {
        Cloud::Aws => AWS_REGIONS,
        Cloud::Gcp => GCP_REGIONS,
        Cloud::Local => {
            return Err(bad("region", v, "the local cloud has no regions").hint("remove region, or pick --cloud aws|gcp"));
        }
    };
    if known.contains(&r.as_str()) {
        return Ok(r);
    }
    let hint = match closest(&r, known) {
        Some(c) => format!("did you mean {c}?"),
        None => format!("use a {cloud} region such as {}", known[0]),
    };
    Err(bad("region", v, format!("'{r}' is not a known {cloud} region")).hint(hint))
}

fn validate_zone(cloud: Cloud, v: &Value, region: Option<&str>) -> Result<String, UserError> {
    let z = v.text.trim().to_ascii_lowercase();
    let (zone_region, ok_suffix) = match cloud {
        // us-east-1a
        Cloud::Aws => {
            let cut = z.trim_end_matches(|c: char| c.is_ascii_lowercase());
            (cut.to_string(), z.len() == cut.len() + 1)
        }
        // us-central1-a
        Cloud::Gcp => match z.rsplit_once('-') {
            Some((r, s)) => (r.to_string(), s.len() == 1 && s.bytes().all(|b| b.is_ascii_lowercase())),
            None => (z.clone(), false),
        },
        Cloud::Local => return Err(bad("zone", v, "the local cloud has no zones").hint("remove zone")),
    };
    let known = if cloud == Cloud::Aws { AWS_REGIONS } else { GCP_REGIONS };
    if !ok_suffix || !known.contains(&zone_region.as_str()) {
        let example = if cloud == Cloud::Aws { "us-east-1a" } else { "us-central1-a" };
        return Err(bad("zone", v, format!("'{z}' is not a {cloud} zone")).hint(format!("use a zone such as {example}")));
    }
    if let Some(r) = region {
        if r != zone_region {
            return Err(bad("zone", v, format!("{z} is not in region {r}")).hint(format!("pick a zone of {r}, or drop region (the zone implies it)")));
        }
    }
    Ok(z)
}

fn validate_instance_type(cloud: Cloud, v: &Value) -> Result<String, UserError> {
    let t = v.text.trim().to_ascii_lowercase();
    let shaped = match cloud {
        Cloud::Aws => t.split_once('.').is_some_and(|(f, s)| {
            !f.is_empty() && !s.is_empty() && f.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && s.bytes().all(|b| b.is_ascii_alphanumeric())
        }),
        Cloud::Gcp => t.contains('-') && !t.contains('.') && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
        Cloud::Local => sizing::parse_local_type(&t).is_some(),
    };
    if !shaped {
        let example = match cloud {
            Cloud::Aws => "m6a.2xlarge",
            Cloud::Gcp => "n2-standard-8",
            Cloud::Local => "local-4x16 (vCPUs x GiB)",
        };
        return Err(bad("instance-type", v, format!("'{t}' is not a {cloud} machine type")).hint(format!("use a type such as {example}, or drop it to get the size tier's type")));
    }
    if cloud != Cloud::Local {
        if let Some((c, m)) = sizing::known_type(&t) {
            if c < sizing::MIN_VCPUS || m < sizing::MIN_MEMORY_GIB {
                return Err(bad("instance-type", v, format!("{t} has {c} vCPU / {m} GiB; Sourcegraph needs at least {} vCPU / {} GiB", sizing::MIN_VCPUS, sizing::MIN_MEMORY_GIB))
                    .hint(if cloud == Cloud::Aws { "use m6a.2xlarge (size XS) or larger" } else { "use n2-standard-8 (size XS) or larger" }));
            }
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(pairs: &[(&'static str, &str)]) -> Layer {
        Layer::from_flags(pairs.iter().map(|(k, v)| (*k, Some(v.to_string()))))
    }

    fn resolve(pairs: &[(&'static str, &str)]) -> Result<Settings, UserError> {
        Settings::resolve(&layer(pairs), &Prompter { interactive: false })
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
        assert_eq!(s.machine(), Machine { instance_type: "local-2x4".into(), vcpus: Some(2), memory_gib: Some(4) });
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
        let s = Settings::resolve(&flags.over(env).over(file), &Prompter { interactive: false }).unwrap();
        assert_eq!(s.size, Size::M);
        assert_eq!(s.cloud, Cloud::Gcp);
        assert_eq!(s.name, "from-file");
    }

    #[test]
    fn toml_round_trip() {
        let s = resolve(&[
            ("cloud", "aws"), ("region", "eu-west-1"), ("zone", "eu-west-1b"), ("size", "S"), ("version", "7.4"),
            ("registry-mirror", "http://10.0.2.2:5000/sg"), ("mirror-mode", "tags-only"), ("hostname", "sg.example.com"),
            ("tls", "letsencrypt"), ("tls-email", "ops@example.com"), ("ssh-cidr", "203.0.113.0/24"), ("data-disk-gb", "500"),
        ])
        .unwrap();
        let text = s.to_toml();
        let again = Settings::resolve(&Layer::parse_toml(&text, Path::new("x.toml")).unwrap(), &Prompter { interactive: false }).unwrap();
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
    fn file_values_report_their_line() {
        let file = Layer::parse_toml("cloud = \"aws\"\n\nsize = \"huge\"\n", Path::new("my.toml")).unwrap();
        let e = Settings::resolve(&file, &Prompter { interactive: false }).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("size"));
        assert!(e.to_string().contains("my.toml:3"), "{e}");
    }
}
