//! The interactive provisioner's questions: what `sgbox up` and `sgbox init` ask on a terminal,
//! in order, each with a default and a one-line why, and each answer validated by the same code
//! (and with the same message) as the flag it stands for.
//!
//! Pure of I/O: the terminal is an [`Ask`] (inquire's prompts in `crate::prompt`), and what the
//! questions need from the world — the region the AWS configuration names, a region's zones, the
//! caller's public address, an existing deployment — is a [`Lookups`]. The answers come back as
//! a [`Layer`] under the given one (flags > SGBOX_* > `-f`), so a given value is never asked, and
//! `Settings::resolve` turns the result into settings exactly as it does for flags.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::checks::{AWS_REGIONS, GCP_REGIONS};
use super::layer::{field_name, Value};
use super::{Cloud, Layer, Settings, Source, DEFAULT_CLOUD_DISK_GB, DEFAULT_LOCAL_DISK_GB, DEFAULT_NAME};
use crate::error::UserError;
use crate::release::catalog::catalog;
use crate::release::pricing;
use crate::release::sizing::{self, Size, ALL_SIZES};

/// One entry of a list question: the value it stands for, and what the user reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub value: String,
    pub label: String,
}

fn choice(value: impl Into<String>, label: impl Into<String>) -> Choice {
    Choice { value: value.into(), label: label.into() }
}

/// A check of a typed answer: `Err` holds the message shown before the question is asked again.
pub type Check = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The terminal, as the questions see it. Every question fails with
/// [`crate::error::Interrupted`] on Ctrl-C or Esc.
pub trait Ask {
    /// Pick one of `choices` (arrow keys, or type to filter); the index of the answer.
    fn select(&mut self, message: &str, help: &str, choices: &[Choice], default: usize) -> anyhow::Result<usize>;
    /// A typed answer; `default` is taken on Enter; `check` rejects bad answers, which are asked again.
    fn text(&mut self, message: &str, help: &str, default: Option<&str>, check: Check) -> anyhow::Result<String>;
    /// Yes or no.
    fn confirm(&mut self, message: &str, help: &str, default: bool) -> anyhow::Result<bool>;
    /// A line for the user: a value given as a flag, a note.
    fn say(&mut self, line: &str);
}

/// What the questions need to know from outside.
pub trait Lookups {
    /// The region the cloud's own configuration names, and where it was found (AWS_REGION, the
    /// profile).
    fn default_region(&self, cloud: Cloud) -> Option<(String, String)>;
    /// The zones of `region` that offer `machine`.
    fn zones(&self, cloud: Cloud, region: &str, machine: &str) -> Result<Vec<String>, String>;
    /// The caller's public address as the internet sees it, and how it was found.
    fn public_address(&self) -> Result<(IpAddr, String), String>;
    /// The recorded settings (TOML) of an existing deployment of this name, and their path.
    fn existing(&self, name: &str) -> Option<(PathBuf, String)>;
}

/// How the walk ended.
#[derive(Debug)]
pub enum Outcome {
    /// New settings: the given values with the answers under them.
    New(Layer),
    /// The name is an existing deployment, and the user chose to resume it: its record applies.
    Resume { name: String, record: PathBuf },
}

/// The order of the questions. Keys never asked (instance-type, web-cidr, the local ports, …)
/// take part in every check from the start when given.
const ORDER: &[&str] = &[
    "name",
    "cloud",
    "region",
    "zone",
    "size",
    "version",
    "data-disk-gb",
    "ssh-cidr",
    "tls",
    "hostname",
    "tls-email",
    "tls-cert",
    "tls-key",
    "registry-mirror",
    "mirror-mode",
];

/// Walk the questions for every value `given` lacks. `clouds` are those this build can create.
pub fn walk(given: &Layer, clouds: &[Cloud], ask: &mut dyn Ask, look: &dyn Lookups) -> anyhow::Result<Outcome> {
    let mut w = Walk { given, answers: Layer::default(), reached: 0, ask };

    // The name first: it may be a deployment that exists, which is resumed, not asked about.
    let name = match w.given_text("name") {
        Some(n) => {
            w.reached = 1;
            w.show("name", "Deployment name");
            n
        }
        None => loop {
            let n = w.text("name", "Deployment name?", "names the state folder and every cloud resource of this box", Some(DEFAULT_NAME))?;
            let Some((record, _)) = look.existing(n.trim()) else { break n };
            let resume = w.ask.confirm(
                &format!("A deployment named \"{}\" exists already. Resume it with its recorded settings?", n.trim()),
                "no: pick another name",
                true,
            )?;
            if resume {
                return Ok(Outcome::Resume { name: n.trim().to_string(), record });
            }
            w.answers = Layer::default();
        },
    };
    if w.given.text("name").is_some() {
        if let Some((record, _)) = look.existing(name.trim()) {
            w.ask.say(&format!("\"{}\" is an existing deployment: its recorded settings apply ({})", name.trim(), record.display()));
            return Ok(Outcome::Resume { name: name.trim().to_string(), record });
        }
    }

    // Cloud.
    let cloud_choices: Vec<Choice> = clouds
        .iter()
        .map(|c| match c {
            Cloud::Aws => choice("aws", "aws    an EC2 instance in your AWS account"),
            Cloud::Gcp => choice("gcp", "gcp    a Compute Engine VM in your Google Cloud project"),
            Cloud::Local => choice("local", "local  a QEMU VM on this machine, to try sgbox (nothing billed)"),
        })
        .collect();
    w.select("cloud", "Where should the box run?", "the clouds this build of sgbox can create boxes on", &cloud_choices, 0)?;
    let cloud: Cloud = w.current().text("cloud").unwrap_or_default().parse().map_err(|m: String| UserError::field("cloud", m))?;

    // Region and zone.
    let mut region = None;
    if cloud != Cloud::Local {
        let known = if cloud == Cloud::Aws { AWS_REGIONS } else { GCP_REGIONS };
        let found = look.default_region(cloud);
        let (default, why) = match &found {
            Some((r, how)) if known.contains(&r.as_str()) => (known.iter().position(|k| k == r).unwrap_or(0), format!("{r} is {how}")),
            _ => (0, "no region is configured; prices differ a little between regions".to_string()),
        };
        let choices: Vec<Choice> = known.iter().map(|r| choice(*r, *r)).collect();
        w.select("region", "Region?", &format!("{why} (type to filter)"), &choices, default)?;
        let r = w.current().text("region").map(str::to_string);
        region = r.clone();
        if let Some(r) = r {
            if w.given_text("zone").is_some() {
                w.take_turn("zone", "Zone")?;
            } else {
                w.reached = position("zone") + 1;
                let machine = w.given_text("instance-type").unwrap_or_else(|| Size::XS.tier().aws.to_string());
                match look.zones(cloud, &r, &machine) {
                    Ok(zones) if !zones.is_empty() => {
                        let mut choices = vec![choice("", "any    sgbox picks a zone that offers the machine")];
                        choices.extend(zones.iter().map(|z| choice(z.clone(), z.clone())));
                        w.select("zone", "Zone?", "the data disk stays in this zone for the box's life", &choices, 0)?;
                    }
                    Ok(_) => w.ask.say(&format!("zone: any (no zone of {r} lists {machine})")),
                    Err(e) => w.ask.say(&format!("zone: any (the zones of {r} could not be listed: {e})")),
                }
            }
        }
    }

    // Size.
    if cloud == Cloud::Local {
        w.reached = position("size") + 1;
        if w.given.text("size").is_some() {
            w.show("size", "Size");
        }
        let m = sizing::LOCAL_DEFAULT;
        let (cpus, gib) = sizing::parse_local_type(m).unwrap_or((2, 4));
        w.ask.say(&format!(
            "Machine: {m}, a {cpus}-vCPU / {gib} GiB VM on this machine: enough to try sgbox and a few\n  \
             repositories, not for a team (Sourcegraph wants 8 vCPU / 32 GiB: --instance-type local-8x32)."
        ));
    } else {
        let disk = w.given_text("data-disk-gb").and_then(|d| d.trim().parse().ok()).unwrap_or(DEFAULT_CLOUD_DISK_GB);
        let choices: Vec<Choice> = ALL_SIZES
            .iter()
            .map(|s| {
                let t = s.tier();
                let machine = if cloud == Cloud::Aws { t.aws } else { t.gcp };
                let cost = match (cloud, region.as_deref()) {
                    (Cloud::Aws, Some(r)) => pricing::aws_monthly(machine, r, disk).map(|e| format!("~${:.0}/month", e.total)),
                    _ => None,
                };
                choice(
                    s.to_string(),
                    format!(
                        "{:<3}{:>7} users {:>8} repos  {:<13} {:>2} vCPU {:>3} GiB  {}",
                        s.to_string(),
                        group(t.users),
                        group(t.repos),
                        machine,
                        t.vcpus,
                        t.memory_gib,
                        cost.unwrap_or_else(|| "price not in sgbox's table".into())
                    ),
                )
            })
            .collect();
        let why = match (cloud, region.as_deref()) {
            (Cloud::Aws, Some(r)) => format!(
                "Sourcegraph's sizing table; on-demand prices in {r} as of {} with a {disk} GB disk (no data transfer, snapshots or taxes)",
                pricing::AS_OF
            ),
            _ => "Sourcegraph's sizing table".to_string(),
        };
        w.select("size", "Size?", &why, &choices, 0)?;
    }

    // Version.
    let latest = catalog().latest().version;
    let mut versions = vec![choice(latest.to_string(), format!("{latest}  the newest release (recommended)"))];
    for (major, minor) in catalog().minors().into_iter().rev().take(8) {
        if let Some(r) = catalog().latest_of_minor(major, minor) {
            if r.version != latest {
                versions.push(choice(r.version.to_string(), format!("{}  the newest {major}.{minor}", r.version)));
            }
        }
    }
    w.select(
        "version",
        "Sourcegraph version?",
        "older releases upgrade in place later with `sgbox upgrade`; `sgbox versions` lists all",
        &versions,
        0,
    )?;

    // Data disk.
    let (disk_default, disk_why) = match cloud {
        Cloud::Local => (DEFAULT_LOCAL_DISK_GB, "repositories, indexes and databases; a sparse file on this machine, kept by `down`"),
        _ => (
            DEFAULT_CLOUD_DISK_GB,
            "repositories, indexes and databases live on this separate disk, kept by `down`; Sourcegraph recommends 250 GB or more",
        ),
    };
    w.text("data-disk-gb", "Data disk size in GB?", disk_why, Some(&disk_default.to_string()))?;

    // Who may reach the box.
    if cloud != Cloud::Local {
        let only_ssh = w.given.text("web-cidr").is_some();
        let reach = if only_ssh { "SSH" } else { "SSH and the site" };
        let (default, why) = if w.given_text("ssh-cidr").is_some() {
            (None, String::new())
        } else {
            match look.public_address() {
                Ok((ip, how)) => {
                    let cidr = ipnet::IpNet::from(ip).to_string();
                    (Some(cidr), format!("your public address, {how}; {reach} open to nobody else"))
                }
                Err(e) => (None, format!("your public address could not be found ({e}): type it, or your office's network")),
            }
        };
        let why = if only_ssh { why } else { format!("{why} (the site opens to more with --web-cidr once you have signed in)") };
        w.text("ssh-cidr", &format!("Who may reach {reach}? (a CIDR)"), &why, default.as_deref())?;
    }

    // Hostname and TLS.
    let plain = match cloud {
        Cloud::Local => "none         plain HTTP, forwarded on 127.0.0.1 only",
        _ => "none         plain HTTP, reachable only from the network above",
    };
    let mut modes = vec![choice("none", plain)];
    if cloud != Cloud::Local {
        modes.push(choice("letsencrypt", "letsencrypt  from Let's Encrypt (a DNS name pointing at the box, and an email)"));
    }
    modes.push(choice("custom", "custom       your own certificate and key (PEM files, sent over SSH)"));
    w.select("tls", "TLS?", "HTTPS needs a host name; Caddy on the box serves it", &modes, 0)?;
    let tls = w.current().text("tls").unwrap_or("none").trim().to_ascii_lowercase();
    if tls == "none" {
        w.text_optional("hostname", "Host name? (Enter: none)", "the DNS name users type; without one the site is at the box's address")?;
    } else {
        w.text("hostname", "Host name?", "the DNS name that points at the box; the certificate is for it", None)?;
    }
    match tls.as_str() {
        "letsencrypt" => {
            w.text("tls-email", "Email for Let's Encrypt?", "Let's Encrypt writes here before a certificate expires", None)?;
        }
        "custom" => {
            w.text("tls-cert", "Certificate chain (PEM file)?", "the server certificate first, then intermediates", None)?;
            w.text("tls-key", "Private key (PEM file)?", "read only by `up`, which sends it to the box over SSH (mode 0600 there)", None)?;
        }
        _ => {}
    }

    // Registry mirror: rarely.
    w.text_optional(
        "registry-mirror",
        "Registry mirror? (Enter: Docker Hub)",
        "rarely needed: only when the box cannot pull from Docker Hub; HOST[:PORT][/PREFIX], http:// for plain HTTP",
    )?;
    if w.current().text("registry-mirror").is_some() {
        let modes = [
            choice("digest", "digest     the mirror serves Sourcegraph's own images (digests are checked)"),
            choice("tags-only", "tags-only  the mirror serves rebuilt images under the same tags"),
        ];
        w.select("mirror-mode", "What does the mirror serve?", "", &modes, 0)?;
    }

    w.reached = ORDER.len();
    Ok(Outcome::New(w.current()))
}

fn position(key: &str) -> usize {
    ORDER.iter().position(|k| *k == key).expect("a wizard key")
}

fn group(n: u32) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

struct Walk<'a> {
    given: &'a Layer,
    answers: Layer,
    /// How many keys of [`ORDER`] have had their turn.
    reached: usize,
    ask: &'a mut dyn Ask,
}

impl Walk<'_> {
    /// What is known so far: the answers, and the given values of keys whose turn has come or
    /// that are never asked.
    fn current(&self) -> Layer {
        let mut l = self.answers.clone();
        for (k, v) in self.given.entries() {
            let asked_later = ORDER.iter().position(|o| *o == k).is_some_and(|i| i >= self.reached);
            if !asked_later {
                l = l.over(Layer::single(k, v.clone()));
            }
        }
        l
    }

    fn given_text(&self, key: &str) -> Option<String> {
        self.given.text(key).map(str::to_string)
    }

    /// `text` as the answer for `key`: `Err` with the message the flag would get.
    fn check(&self, key: &'static str, text: &str) -> Result<(), String> {
        let candidate = Layer::single(key, Value { text: text.to_string(), source: Source::Prompt }).over(self.current());
        problem(&candidate, key)
    }

    /// A given value's turn: shown, and checked like the flag (a bad one ends the walk, exit 2).
    fn show(&mut self, key: &'static str, label: &str) {
        if let Some(v) = self.given.get(key) {
            let from = match &v.source {
                Source::Flag => format!("--{key}"),
                Source::Env => field_name(key, v),
                Source::File { path, line } => format!("{}:{line}", path.display()),
                Source::Prompt => "answered".into(),
            };
            self.ask.say(&format!("{label}: {} (from {from})", v.text.trim()));
        }
    }

    fn take_turn(&mut self, key: &'static str, label: &str) -> Result<Option<String>, UserError> {
        self.reached = self.reached.max(position(key) + 1);
        if self.given.get(key).is_none() {
            return Ok(None);
        }
        self.show(key, label);
        match Settings::resolve(&self.current()) {
            Err(e) if e.field.as_deref().is_some_and(|f| self.given.get(key).is_some_and(|v| f == field_name(key, v))) => Err(e),
            _ => Ok(self.given_text(key)),
        }
    }

    fn answer(&mut self, key: &'static str, text: String) {
        self.answers = Layer::single(key, Value { text, source: Source::Prompt }).over(std::mem::take(&mut self.answers));
    }

    fn select(&mut self, key: &'static str, message: &str, help: &str, choices: &[Choice], default: usize) -> anyhow::Result<()> {
        if self.take_turn(key, message.trim_end_matches('?'))?.is_some() {
            return Ok(());
        }
        loop {
            let i = self.ask.select(message, help, choices, default)?;
            let value = choices[i].value.clone();
            if value.is_empty() {
                return Ok(());
            }
            match self.check(key, &value) {
                Ok(()) => {
                    self.answer(key, value);
                    return Ok(());
                }
                Err(msg) => self.ask.say(&msg),
            }
        }
    }

    fn text(&mut self, key: &'static str, message: &str, help: &str, default: Option<&str>) -> anyhow::Result<String> {
        if let Some(v) = self.take_turn(key, message.trim_end_matches('?'))? {
            return Ok(v);
        }
        let here = self.current();
        let check: Check = Arc::new(move |t: &str| {
            if t.trim().is_empty() {
                return Err("an answer is needed here".into());
            }
            problem(&Layer::single(key, Value { text: t.trim().to_string(), source: Source::Prompt }).over(here.clone()), key)
        });
        let t = self.ask.text(message, help, default, check)?.trim().to_string();
        self.answer(key, t.clone());
        Ok(t)
    }

    /// A question whose empty answer leaves the key unset.
    fn text_optional(&mut self, key: &'static str, message: &str, help: &str) -> anyhow::Result<()> {
        let label = message.split('?').next().unwrap_or(message);
        if self.take_turn(key, label)?.is_some() {
            return Ok(());
        }
        let here = self.current();
        let check: Check = Arc::new(move |t: &str| {
            if t.trim().is_empty() {
                return Ok(());
            }
            problem(&Layer::single(key, Value { text: t.trim().to_string(), source: Source::Prompt }).over(here.clone()), key)
        });
        let t = self.ask.text(message, help, None, check)?.trim().to_string();
        if !t.is_empty() {
            self.answer(key, t);
        }
        Ok(())
    }
}

/// The problem `layer` has with `key`, in the words the flag would get; problems of other keys
/// (a value still to be asked) are not this answer's.
fn problem(layer: &Layer, key: &str) -> Result<(), String> {
    match Settings::resolve(layer) {
        Err(e) if e.field.as_deref() == Some(key) => {
            let msg = e.message.replace(" (answered at the prompt)", "");
            Err(match &e.hint {
                Some(h) => format!("{msg} (fix: {h})"),
                None => msg,
            })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
