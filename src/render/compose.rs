//! The docker-compose file: the release decides which services exist (the catalog), and
//! `templates/services.toml` says how each one runs. sgbox's changes to the official file are
//! generated passwords, Prometheus and Grafana bound to 127.0.0.1, a pinned project name, CPU
//! limits that fit the machine, and Caddy configured for the TLS mode.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::release::catalog::{ImageRef, Release};
use crate::release::version::Version;
use crate::settings::{MirrorMode, Settings, Tls};

const SERVICES_TOML: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/services.toml"));

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Health {
    test: toml::Value,
    interval: String,
    timeout: String,
    retries: u32,
    start_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Variant {
    #[serde(default)]
    env: Vec<String>,
    command: Option<Vec<String>>,
    expose: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSpec {
    cpus: f64,
    mem: String,
    command: Option<Vec<String>>,
    restart: Option<String>,
    hostname: Option<String>,
    shm_size: Option<String>,
    stop_grace_period: Option<String>,
    #[serde(default)]
    privileged: bool,
    pid: Option<String>,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    expose: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    network_mode: Option<String>,
    #[serde(default)]
    handover: bool,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    env_if: BTreeMap<String, Vec<String>>,
    health: Option<Health>,
    #[serde(default)]
    depends_on: IndexMap<String, String>,
    #[serde(default)]
    before: BTreeMap<String, Variant>,
    #[serde(default)]
    since: BTreeMap<String, Variant>,
}

fn specs() -> &'static BTreeMap<String, ServiceSpec> {
    static SPECS: OnceLock<BTreeMap<String, ServiceSpec>> = OnceLock::new();
    SPECS.get_or_init(|| toml::from_str(SERVICES_TOML).expect("templates/services.toml is valid (checked by tests)"))
}

#[derive(Serialize)]
struct HealthView {
    test: String,
    test_list: Vec<String>,
    interval: String,
    timeout: String,
    retries: u32,
    start_period: Option<String>,
}

#[derive(Serialize)]
struct Dep {
    service: String,
    condition: String,
}

#[derive(Serialize)]
struct ServiceView {
    name: String,
    image: String,
    cpus: String,
    mem: String,
    command: Vec<String>,
    hostname: Option<String>,
    privileged: bool,
    pid: Option<String>,
    shm_size: Option<String>,
    env: Vec<String>,
    volumes: Vec<String>,
    devices: Vec<String>,
    ports: Vec<String>,
    network_mode: Option<String>,
    expose: Vec<String>,
    health: Option<HealthView>,
    depends_on: Vec<Dep>,
    stop_grace_period: Option<String>,
    restart: String,
}

/// The image reference the box pulls: the official one, or the mirror's copy of it.
pub fn image_ref(img: &ImageRef, s: &Settings) -> String {
    match &s.registry_mirror {
        None => img.official(),
        Some(m) => match s.mirror_mode {
            MirrorMode::Digest => format!("{}/{}:{}@{}", m.base, img.short_name(), img.tag, img.digest),
            MirrorMode::TagsOnly => format!("{}/{}:{}", m.base, img.short_name(), img.tag),
        },
    }
}

pub(super) fn render(t: &tera::Tera, s: &Settings, release: &Release, vcpus: Option<u32>) -> Result<String> {
    let specs = specs();
    let mut services = Vec::new();
    for (name, img) in &release.services {
        let Some(spec) = specs.get(name) else {
            bail!("release {} has a service `{name}` that templates/services.toml does not describe", release.version);
        };
        services.push(view(name, spec, img, s, release, vcpus).with_context(|| format!("service {name}"))?);
    }
    let mut ctx = tera::Context::new();
    ctx.insert("release", &release.version.to_string());
    ctx.insert("deployment", &s.name);
    ctx.insert("sgbox_version", env!("CARGO_PKG_VERSION"));
    ctx.insert("project", super::PROJECT);
    ctx.insert("mirror", &s.registry_mirror.as_ref().map(|m| m.to_string()));
    ctx.insert("services", &services);
    ctx.insert("volumes", &release.volumes);
    super::render_one(t, "compose", &ctx)
}

fn view(name: &str, spec: &ServiceSpec, img: &ImageRef, s: &Settings, release: &Release, vcpus: Option<u32>) -> Result<ServiceView> {
    let mut env = spec.env.clone();
    for (svc, extra) in &spec.env_if {
        if release.has(svc) {
            env.extend(extra.iter().cloned());
        }
    }
    let mut command = spec.command.clone().unwrap_or_default();
    let mut expose = spec.expose.clone();
    let variants = spec.before.iter().map(|(v, var)| (v, var, true)).chain(spec.since.iter().map(|(v, var)| (v, var, false)));
    for (v, var, before) in variants {
        let at: Version = v.parse().with_context(|| format!("version key {v}"))?;
        if (release.version < at) == before {
            env.extend(var.env.iter().cloned());
            if let Some(c) = &var.command {
                command = c.clone();
            }
            if let Some(e) = &var.expose {
                expose = e.clone();
            }
        }
    }
    let mut volumes = spec.volumes.clone();
    if name == "caddy" && matches!(s.tls, Tls::Custom { .. }) {
        volumes.push("./tls/sourcegraph.pem:/sourcegraph.pem:ro".into());
        volumes.push("./tls/sourcegraph.key:/sourcegraph.key:ro".into());
    }
    // Docker refuses a CPU limit above the machine's CPU count, so the official limits are capped.
    let cpus = match vcpus {
        Some(n) if spec.cpus > f64::from(n) => f64::from(n),
        _ => spec.cpus,
    };
    let health = match &spec.health {
        None => None,
        Some(h) => {
            let (test, test_list) = match &h.test {
                toml::Value::String(s) => (s.clone(), vec![]),
                toml::Value::Array(a) => {
                    (String::new(), a.iter().map(|x| x.as_str().map(str::to_string).context("health test items are strings")).collect::<Result<_>>()?)
                }
                other => bail!("health test must be a string or a list, not {}", other.type_str()),
            };
            Some(HealthView {
                test,
                test_list,
                interval: h.interval.clone(),
                timeout: h.timeout.clone(),
                retries: h.retries,
                start_period: h.start_period.clone(),
            })
        }
    };
    Ok(ServiceView {
        name: name.to_string(),
        image: image_ref(img, s),
        cpus: format!("{cpus}"),
        mem: spec.mem.clone(),
        command,
        hostname: spec.hostname.clone(),
        privileged: spec.privileged,
        pid: spec.pid.clone(),
        shm_size: spec.shm_size.clone(),
        env,
        volumes,
        devices: spec.devices.clone(),
        ports: spec.ports.clone(),
        network_mode: spec.network_mode.clone(),
        expose,
        health,
        depends_on: spec.depends_on.iter().filter(|(d, _)| release.has(d)).map(|(d, c)| Dep { service: d.clone(), condition: c.clone() }).collect(),
        stop_grace_period: spec.stop_grace_period.clone(),
        restart: spec.restart.clone().unwrap_or_else(|| "always".into()),
    })
}

/// The services of `release` that a standard upgrade hands over through a copy holding their name
/// (`handover = true` in templates/services.toml), in the release's order.
pub fn handover_services(release: &Release) -> Vec<String> {
    release.services.keys().filter(|n| specs().get(*n).is_some_and(|s| s.handover)).cloned().collect()
}

/// Whether service `name` of `release` has a `depends_on`. Compose hashes a service's
/// configuration without it under `--no-deps`, so such a service created with `--no-deps` is
/// recreated by the next plain `up`; the upgrade brings these up with their dependencies (its
/// tests check that with this).
#[cfg(test)]
pub fn has_dependencies(release: &Release, name: &str) -> bool {
    specs().get(name).is_some_and(|s| s.depends_on.keys().any(|d| release.has(d)))
}

#[cfg(test)]
pub(super) fn known_services() -> Vec<String> {
    specs().keys().cloned().collect()
}
