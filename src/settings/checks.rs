//! Per-key and per-cloud validation of raw values: regions, zones, machine types, CIDRs, TLS,
//! and the AWS- and local-only keys. Each check names the field, where its value came from and a
//! fix.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;

use super::layer::{bad, field_name, src_note, Layer, Value};
use super::{Accel, AwsSettings, Cloud, LocalSettings, Tls};
use crate::error::UserError;
use crate::release::sizing;

pub(super) fn resolve_aws(layer: &Layer, cloud: Cloud) -> Result<AwsSettings, UserError> {
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

pub(super) fn resolve_local(layer: &Layer, cloud: Cloud) -> Result<LocalSettings, UserError> {
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
            other => {
                return Err(bad("accel", v, format!("'{other}' is not an accelerator")).hint("use auto (probe KVM, fall back to TCG), kvm or tcg"))
            }
        },
        None => Accel::Auto,
    };
    let port = |k: &str| -> Result<Option<u16>, UserError> {
        match layer.get(k) {
            Some(v) => match v.text.trim().parse::<u16>() {
                Ok(0) => Ok(None),
                Ok(p) if p >= 1024 => Ok(Some(p)),
                _ => Err(bad(k, v, format!("'{}' is not a port from 1024 to 65535", v.text))
                    .hint("pick a free unprivileged port, or 0 / omit it to pick one automatically")),
            },
            None => Ok(None),
        }
    };
    let (ssh_port, http_port, https_port) = (port("ssh-port")?, port("http-port")?, port("https-port")?);
    // The later of two keys with one port is the one named (ssh-port, http-port, https-port).
    let ports = [("ssh-port", ssh_port), ("http-port", http_port), ("https-port", https_port)];
    for (i, (key, port)) in ports.iter().enumerate() {
        if let Some((first, p)) = ports[..i].iter().find(|(_, q)| q.is_some() && q == port) {
            let v = layer.get(key).expect("a given port has a value");
            return Err(bad(key, v, format!("port {} is {first} already", p.unwrap_or_default()))
                .hint("give ssh-port, http-port and https-port different values"));
        }
    }
    Ok(LocalSettings { base_image, accel, ssh_port, http_port, https_port })
}

pub(super) fn resolve_tls(layer: &Layer, hostname: Option<&str>, files: super::UserFiles) -> Result<Tls, UserError> {
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
            Some(v) => {
                Err(bad(k, v, format!("does not apply with tls = {mode_text}")).hint(format!("remove {k}, or choose the TLS mode it belongs to")))
            }
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
            // The local part goes into the Caddyfile: only the characters of a plain address (no
            // space, newline, brace or quote could then start a directive).
            let local_ok = |u: &str| !u.is_empty() && u.len() <= 64 && u.bytes().all(|b| b.is_ascii_alphanumeric() || b".+-_".contains(&b));
            let ok = addr.split_once('@').is_some_and(|(u, d)| local_ok(u) && is_hostname(d) && d.contains('.'));
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
                if files == super::UserFiles::Recorded {
                    return Ok(p);
                }
                let text = std::fs::read_to_string(&p)
                    .map_err(|e| bad(k, v, format!("cannot read {}: {e}", p.display())).hint("give the path of a readable PEM file"))?;
                if !text.contains("-----BEGIN ") {
                    return Err(bad(k, v, format!("{} is not a PEM file", p.display())).hint(format!("give the {what} in PEM form (-----BEGIN …)")));
                }
                Ok(std::fs::canonicalize(&p).unwrap_or(p))
            };
            Ok(Tls::Custom { cert: file(cert, "tls-cert", "certificate chain")?, key: file(key, "tls-key", "private key")? })
        }
        other => {
            Err(bad("tls", mode.expect("tls set when not defaulted"), format!("'{other}' is not a TLS mode")).hint("use none, letsencrypt or custom"))
        }
    }
}

pub(super) fn validate_cidr(key: &str, v: &Value, allow_any: bool) -> Result<IpNet, UserError> {
    let t = v.text.trim();
    let net: IpNet = match t.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match t.parse::<IpAddr>() {
            // A bare address means that one host.
            Ok(ip) => IpNet::from(ip),
            Err(_) => return Err(bad(key, v, format!("'{t}' is not a CIDR block")).hint("write an address and prefix length, e.g. 203.0.113.7/32")),
        },
    };
    if net.trunc() != net {
        return Err(bad(key, v, format!("'{t}' has host bits set beyond /{}", net.prefix_len())).hint(format!(
            "did you mean {} (the network) or {}/{} (one host)?",
            net.trunc(),
            net.addr(),
            net.max_prefix_len()
        )));
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
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !l.starts_with('-') && !l.ends_with('-')
        })
        && !h.rsplit('.').next().unwrap_or("").bytes().all(|b| b.is_ascii_digit())
}

pub(super) fn is_deployment_name(n: &str) -> bool {
    let b = n.as_bytes();
    (2..=32).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !n.ends_with('-')
}

/// Regions where the size tiers' instance types are offered. A new region is one line here.
pub const AWS_REGIONS: &[&str] = &[
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "ca-central-1",
    "ca-west-1",
    "sa-east-1",
    "mx-central-1",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-central-1",
    "eu-central-2",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
    "ap-south-1",
    "ap-south-2",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "ap-southeast-4",
    "ap-southeast-5",
    "ap-southeast-7",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-east-1",
    "me-south-1",
    "me-central-1",
    "il-central-1",
    "af-south-1",
    "us-gov-east-1",
    "us-gov-west-1",
];

pub const GCP_REGIONS: &[&str] = &[
    "us-central1",
    "us-east1",
    "us-east4",
    "us-east5",
    "us-south1",
    "us-west1",
    "us-west2",
    "us-west3",
    "us-west4",
    "northamerica-northeast1",
    "northamerica-northeast2",
    "northamerica-south1",
    "southamerica-east1",
    "southamerica-west1",
    "europe-west1",
    "europe-west2",
    "europe-west3",
    "europe-west4",
    "europe-west6",
    "europe-west8",
    "europe-west9",
    "europe-west10",
    "europe-west12",
    "europe-north1",
    "europe-north2",
    "europe-central2",
    "europe-southwest1",
    "asia-east1",
    "asia-east2",
    "asia-northeast1",
    "asia-northeast2",
    "asia-northeast3",
    "asia-south1",
    "asia-south2",
    "asia-southeast1",
    "asia-southeast2",
    "australia-southeast1",
    "australia-southeast2",
    "me-central1",
    "me-central2",
    "me-west1",
    "africa-south1",
];

pub(super) fn closest<'a>(s: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    known.into_iter().map(|k| (strsim::jaro_winkler(s, k), k)).filter(|(sc, _)| *sc > 0.85).max_by(|a, b| a.0.total_cmp(&b.0)).map(|(_, k)| k)
}

pub(super) fn validate_region(cloud: Cloud, v: &Value) -> Result<String, UserError> {
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
    let hint = match closest(&r, known.iter().copied()) {
        Some(c) => format!("did you mean {c}?"),
        None => format!("use a {cloud} region such as {}", known[0]),
    };
    Err(bad("region", v, format!("'{r}' is not a known {cloud} region")).hint(hint))
}

pub(super) fn validate_zone(cloud: Cloud, v: &Value, region: Option<&str>) -> Result<String, UserError> {
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

pub(super) fn validate_instance_type(cloud: Cloud, v: &Value) -> Result<String, UserError> {
    let t = v.text.trim().to_ascii_lowercase();
    let shaped = match cloud {
        Cloud::Aws => t.split_once('.').is_some_and(|(f, s)| {
            !f.is_empty()
                && !s.is_empty()
                && f.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && s.bytes().all(|b| b.is_ascii_alphanumeric())
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
        return Err(bad("instance-type", v, format!("'{t}' is not a {cloud} machine type"))
            .hint(format!("use a type such as {example}, or drop it to get the size tier's type")));
    }
    if cloud != Cloud::Local {
        if let Some((c, m)) = sizing::known_type(&t) {
            if c < sizing::MIN_VCPUS || m < sizing::MIN_MEMORY_GIB {
                return Err(bad(
                    "instance-type",
                    v,
                    format!("{t} has {c} vCPU / {m} GiB; Sourcegraph needs at least {} vCPU / {} GiB", sizing::MIN_VCPUS, sizing::MIN_MEMORY_GIB),
                )
                .hint(if cloud == Cloud::Aws {
                    "use m6a.2xlarge (size XS) or larger"
                } else {
                    "use n2-standard-8 (size XS) or larger"
                }));
            }
        }
    }
    Ok(t)
}

/// The largest override `up` takes: it travels in the user-data, and EC2 accepts 16 KiB of that
/// in all, most of it sgbox's own files.
const COMPOSE_OVERRIDE_MAX: usize = 8 * 1024;

/// `compose-override`: the user's docker-compose.override.yaml for a new box, checked before
/// anything is created. Compose merges it over the release's file at every start, upgrade and
/// rollback, so it may name only the release's services (or add a service of its own, with its
/// image), and never the project's `name`, which sgbox's commands address the stack by.
pub(super) fn resolve_compose_override(layer: &Layer, release: &crate::release::catalog::Release) -> Result<Option<(PathBuf, String)>, UserError> {
    use yaml_rust2::{Yaml, YamlLoader};
    const KEY: &str = "compose-override";
    let Some(v) = layer.get(KEY) else { return Ok(None) };
    let path = PathBuf::from(v.text.trim());
    let text = std::fs::read_to_string(&path)
        .map_err(|e| bad(KEY, v, format!("cannot read {}: {e}", path.display())).hint("give the path of a readable docker-compose.override.yaml"))?;
    if text.len() > COMPOSE_OVERRIDE_MAX {
        return Err(bad(KEY, v, format!("{} is {} bytes; a new box takes at most {COMPOSE_OVERRIDE_MAX}", path.display(), text.len())).hint(
            "keep only the changes in it; larger ones can go onto the box after `up` (sgbox ssh -- sudo tee /opt/sgbox/docker-compose.override.yaml)",
        ));
    }
    let fix = "write a Compose override: a mapping with `services:` (and `volumes:`/`networks:` if needed), as in the file sgbox creates";
    let docs = YamlLoader::load_from_str(&text)
        .map_err(|e| bad(KEY, v, format!("{} is not YAML: {e}", path.display())).hint("fix the YAML at that position"))?;
    let doc = match docs.as_slice() {
        [d] => d,
        [] => return Err(bad(KEY, v, format!("{} is empty", path.display())).hint(fix)),
        _ => return Err(bad(KEY, v, format!("{} holds {} YAML documents; Compose reads one", path.display(), docs.len())).hint(fix)),
    };
    let Yaml::Hash(top) = doc else {
        return Err(bad(KEY, v, format!("{} is not a mapping of Compose keys", path.display())).hint(fix));
    };
    for (k, val) in top {
        let key = k.as_str().unwrap_or_default();
        match key {
            "services" => {
                match val {
                    Yaml::Hash(services) => {
                        for (name, body) in services {
                            let name = name.as_str().unwrap_or_default().to_string();
                            let own_image = matches!(body, Yaml::Hash(b) if b.contains_key(&Yaml::String("image".into())));
                            if !release.services.contains_key(&name) && !own_image {
                                let near = closest(&name, release.services.keys().map(String::as_str));
                                return Err(bad(KEY, v, format!("service \"{name}\" is not one of Sourcegraph {}'s, and has no image of its own", release.version))
                                .hint(match near {
                                    Some(n) => format!("did you mean \"{n}\"? (`sgbox render` writes the release's docker-compose.yaml)"),
                                    None => "name a service of the release's docker-compose.yaml (`sgbox render` writes it), or give a new service its image".into(),
                                }));
                            }
                        }
                    }
                    Yaml::Null => {}
                    _ => return Err(bad(KEY, v, format!("`services` in {} is not a mapping", path.display())).hint(fix)),
                }
            }
            "volumes" | "networks" | "configs" | "secrets" => {}
            k if k.starts_with("x-") => {}
            "name" => {
                return Err(bad(KEY, v, format!("{} sets the Compose project's name, which sgbox's commands address the stack by", path.display()))
                    .hint("remove the top-level `name:`"))
            }
            other => return Err(bad(KEY, v, format!("`{other}` in {} is not a key of a Compose override", path.display())).hint(fix)),
        }
    }
    Ok(Some((std::fs::canonicalize(&path).unwrap_or(path), text)))
}
