//! What a deployment owns on its cloud, computed from the settings alone (no I/O): the machine,
//! the disk, who may reach SSH, and each resource with the name and description `up` gives it.
//! `plan` prints it and the clouds build from it, so a resource's name is decided here only
//! (and a Terraform export can read the same list later).

use ipnet::IpNet;
use serde::Serialize;

use crate::release::sizing::MachineType;
use crate::settings::{AwsSettings, Cloud, LocalSettings, Settings};

/// One resource `up` would create.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PlannedResource {
    pub kind: &'static str,
    /// Its role in the deployment (the `sgbox:role` tag on clouds).
    #[serde(skip)]
    pub role: &'static str,
    pub name: String,
    pub detail: String,
}

/// A deployment's cloud resources, as the clouds need them.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub cloud: Cloud,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub machine: MachineType,
    pub data_disk_gb: u32,
    pub ssh_cidr: Option<IpNet>,
    /// Who may reach HTTP(S) (the SSH CIDR unless the user opened it).
    pub web_cidr: Option<IpNet>,
    pub allow_undersized: bool,
    /// The release whose baked image (`sgbox image build`) the box can boot from: its own, when
    /// it uses the official image references a baked image holds (no registry mirror).
    pub baked_release: Option<String>,
    /// The release the box runs (recorded beside its data disk).
    pub release: crate::release::version::Version,
    pub aws: AwsSettings,
    pub local: LocalSettings,
    pub resources: Vec<PlannedResource>,
}

impl Spec {
    pub fn of(s: &Settings) -> Spec {
        let m = s.machine();
        Spec {
            name: s.name.clone(),
            cloud: s.cloud,
            region: s.region.clone(),
            zone: s.zone.clone(),
            resources: resources(s, &m),
            machine: m,
            data_disk_gb: s.data_disk_gb,
            ssh_cidr: s.ssh_cidr,
            web_cidr: s.web_cidr(),
            allow_undersized: s.allow_undersized,
            baked_release: s.registry_mirror.is_none().then(|| s.version.to_string()),
            release: s.version,
            aws: s.aws.clone(),
            local: s.local.clone(),
        }
    }

    /// The name of the resource with `role`; for what `up` does not create but a later step may
    /// (snapshots, a restored volume), `<deployment>-<role>`.
    pub fn name_of(&self, role: &str) -> String {
        match self.resources.iter().find(|r| r.role == role) {
            Some(r) => r.name.clone(),
            None => format!("{}-{role}", self.name),
        }
    }
}

fn resources(s: &Settings, m: &MachineType) -> Vec<PlannedResource> {
    let n = &s.name;
    let shape = match (m.vcpus, m.memory_gib) {
        (Some(c), Some(g)) => format!("{} ({c} vCPU, {g} GiB)", m.instance_type),
        _ => format!("{} (checked by the cloud at creation)", m.instance_type),
    };
    let ssh = match s.ssh_cidr {
        Some(c) => c.to_string(),
        None => "the --ssh-cidr you give (required by `up` on clouds)".to_string(),
    };
    let web = match s.web_cidr() {
        Some(c) if c.prefix_len() == 0 => "anywhere".to_string(),
        Some(c) => c.to_string(),
        None => "the --ssh-cidr you give (until --web-cidr opens it)".to_string(),
    };
    let zone = s.zone.as_ref().map(|z| format!(" in {z}")).unwrap_or_default();
    let r = |kind, role, name: String, detail: String| PlannedResource { kind, role, name, detail };
    match s.cloud {
        Cloud::Aws => vec![
            r("security-group", "firewall", format!("{n}-sgbox"), format!("80 and 443 from {web}; 22 from {ssh}; nothing else")),
            r("key-pair", "key", format!("{n}-sgbox"), "ed25519, from the deployment's SSH key".into()),
            r("instance", "box", format!("{n}-box"), format!("{shape}{zone}, Debian 13, IMDSv2 required, encrypted gp3 root")),
            r("volume", "data", format!("{n}-data"), format!("{} GiB gp3, encrypted, kept when the instance is deleted", s.data_disk_gb)),
            r("elastic-ip", "address", format!("{n}-address"), "stable address across stop/start".into()),
        ],
        Cloud::Gcp => vec![
            r("firewall", "web", format!("{n}-web"), format!("80 and 443 from {web}")),
            r("firewall", "ssh", format!("{n}-ssh"), format!("22 from {ssh}")),
            r("instance", "box", n.clone(), format!("{shape}{zone}, Debian 13, Shielded VM")),
            r("disk", "data", format!("{n}-data"), format!("{} GB pd-ssd, kept when the instance is deleted", s.data_disk_gb)),
            r("address", "address", format!("{n}-ip"), "static external address".into()),
        ],
        Cloud::Local => vec![
            r("overlay", "root", format!("{n}/local/overlay.qcow2"), "copy-on-write over the Debian 13 base image".into()),
            r("disk", "data", format!("{n}/local/data.qcow2"), format!("{} GB, kept by `down` unless --delete-data", s.data_disk_gb)),
            r("seed", "seed", format!("{n}/local/seed.iso"), "NoCloud seed with the rendered user-data (mode 0600)".into()),
            r("vm", "box", n.clone(), format!("QEMU {shape} ({} acceleration); SSH, HTTP and HTTPS forwarded on 127.0.0.1 only", s.local.accel)),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Layer;

    fn spec(pairs: &[(&'static str, &str)]) -> Spec {
        let layer = Layer::from_flags(pairs.iter().map(|(k, v)| (*k, Some(v.to_string()))));
        Spec::of(&Settings::resolve(&layer).unwrap())
    }

    #[test]
    fn aws_plan_keeps_ssh_closed_to_the_world_and_names_each_resource_once() {
        let s = spec(&[("cloud", "aws"), ("ssh-cidr", "198.51.100.0/24"), ("zone", "us-east-1b")]);
        let r = &s.resources;
        assert_eq!(r.len(), 5);
        assert!(r[0].detail.contains("22 from 198.51.100.0/24"));
        assert!(r.iter().any(|x| x.kind == "volume" && x.detail.contains("encrypted")));
        assert!(r[2].detail.contains("in us-east-1b"), "{}", r[2].detail);
        assert_eq!(s.name_of("box"), "sourcegraph-box");
        assert_eq!(s.name_of("firewall"), "sourcegraph-sgbox", "the security group's tag and name agree");
        assert_eq!(s.name_of("snapshot"), "sourcegraph-snapshot");
    }
}
