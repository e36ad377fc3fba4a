//! `sgbox plan`: the resolved settings, machine, release and the resources `up` would create.
//! Offline: it calls no cloud API (the cloud providers add their live view later).

use anyhow::Result;
use serde::Serialize;
use serde_json::json;

use super::Context;
use crate::cli::PlanArgs;
use crate::settings::{Cloud, Settings, Tls};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Resource {
    pub kind: &'static str,
    pub name: String,
    pub detail: String,
}

/// What `up` creates for these settings, named as it will name them.
pub fn resources(s: &Settings) -> Vec<Resource> {
    let m = s.machine();
    let n = &s.name;
    let shape = match (m.vcpus, m.memory_gib) {
        (Some(c), Some(g)) => format!("{} ({c} vCPU, {g} GiB)", m.instance_type),
        _ => format!("{} (checked by the cloud at creation)", m.instance_type),
    };
    let ssh = match s.ssh_cidr {
        Some(c) => c.to_string(),
        None => "the --ssh-cidr you give (required by `up` on clouds)".to_string(),
    };
    let r = |kind, name: String, detail: String| Resource { kind, name, detail };
    match s.cloud {
        Cloud::Aws => vec![
            r("security-group", format!("{n}-sgbox"), format!("80 and 443 from anywhere; 22 from {ssh}; nothing else")),
            r("key-pair", format!("{n}-sgbox"), "ed25519, from the deployment's SSH key".into()),
            r("instance", format!("{n}-box"), format!("{shape}, Debian 13, IMDSv2 required, encrypted gp3 root")),
            r("volume", format!("{n}-data"), format!("{} GiB gp3, encrypted, kept when the instance is deleted", s.data_disk_gb)),
            r("elastic-ip", format!("{n}-address"), "stable address across stop/start".into()),
        ],
        Cloud::Gcp => vec![
            r("firewall", format!("{n}-web"), "80 and 443 from anywhere".into()),
            r("firewall", format!("{n}-ssh"), format!("22 from {ssh}")),
            r("instance", n.clone(), format!("{shape}, Debian 13, Shielded VM")),
            r("disk", format!("{n}-data"), format!("{} GB pd-ssd, kept when the instance is deleted", s.data_disk_gb)),
            r("address", format!("{n}-ip"), "static external address".into()),
        ],
        Cloud::Local => vec![
            r("overlay", format!("{n}/local/overlay.qcow2"), "copy-on-write over the Debian 13 base image".into()),
            r("disk", format!("{n}/local/data.qcow2"), format!("{} GB, kept by `down` unless --delete-data", s.data_disk_gb)),
            r("seed", format!("{n}/local/seed.iso"), "NoCloud seed with the rendered user-data (mode 0600)".into()),
            r("vm", n.clone(), format!("QEMU {shape} ({} acceleration); SSH, HTTP and HTTPS forwarded on 127.0.0.1 only", s.local.accel)),
        ],
    }
}

pub fn run(ctx: &Context, args: PlanArgs) -> Result<()> {
    let s = ctx.settings(&args.deployment)?;
    if args.print_config {
        print!("{}", s.to_toml());
        return Ok(());
    }
    let release = s.release();
    let m = s.machine();
    let tier = s.size.tier();
    let res = resources(&s);
    let url = match (&s.tls, &s.hostname) {
        (Tls::None, Some(h)) => format!("http://{h}"),
        (Tls::None, None) => "http://<public address>".into(),
        (_, Some(h)) => format!("https://{h}"),
        (_, None) => unreachable!("TLS modes need a hostname"),
    };
    let cost = match s.cloud {
        Cloud::Aws => crate::pricing::aws_monthly(&m.instance_type, s.region.as_deref().unwrap_or("us-east-1"), s.data_disk_gb),
        _ => None,
    };
    // The live view: only read calls (resources() lists by tag or by file).
    let live = if args.live {
        let dir = ctx.deployment_dir(&s.name)?;
        let found = super::boxctl::runtime()?.block_on(async {
            let p = crate::provider::for_deployment(&s, &dir, crate::state::cache_root()?).await?;
            anyhow::Ok(p.resources().await?)
        })?;
        Some(found)
    } else {
        None
    };
    if ctx.json() {
        return ctx.print_json(json!({
            "existing": live,
            "monthly_cost_usd": cost,
            "settings": s,
            "machine": m,
            "tier": tier,
            "release": { "version": release.version, "services": release.services.len(), "postgres": release.postgres_major() },
            "url": url,
            "resources": res,
            "offline": live.is_none(),
        }));
    }
    println!("Deployment   {} on {}{}", s.name, s.cloud, s.region.as_ref().map(|r| format!(" ({r})")).unwrap_or_default());
    println!("Sourcegraph  {} ({} services, Postgres {})", release.version, release.services.len(), release.postgres_major());
    if s.cloud == Cloud::Local {
        println!("Machine      {} (evaluation box)", m.instance_type);
    } else {
        println!(
            "Size         {}: up to {} users / {} repos -> {}{}",
            s.size,
            tier.users,
            tier.repos,
            m.instance_type,
            m.vcpus.map(|c| format!(" ({c} vCPU, {} GiB)", m.memory_gib.unwrap_or(0))).unwrap_or_default()
        );
    }
    println!("Data disk    {} GB", s.data_disk_gb);
    println!("URL          {url}");
    if let Some(mirror) = &s.registry_mirror {
        println!("Images from  {mirror}");
    }
    match (&cost, s.cloud) {
        (Some(c), _) => println!(
            "Cost         ~${:.0}/month (instance ${:.0} + gp3 ${:.0} + IPv4 ${:.2}; {})",
            c.total, c.instance, c.storage, c.address, c.note
        ),
        (None, Cloud::Aws) => println!("Cost         not in sgbox's price table for {} in this region", m.instance_type),
        _ => {}
    }
    match &live {
        Some(found) if !found.is_empty() => {
            println!("Exists already (found by tag; `up` reuses it):");
            for r in found {
                println!("  = {:<15} {}", r.kind, r.id);
            }
            println!("Would create what is missing of:");
        }
        _ => println!("Would create:"),
    }
    for r in &res {
        println!("  + {:<15} {:<22} {}", r.kind, r.name, r.detail);
    }
    if live.is_some() {
        ctx.note("(read-only: nothing in the cloud was changed)");
    } else {
        ctx.note("(offline plan: nothing in the cloud was looked at or changed; --live reads it)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Layer, Prompter};

    #[test]
    fn aws_plan_keeps_ssh_closed_to_the_world() {
        let s = Settings::resolve(
            &Layer::from_flags([("cloud", Some("aws".into())), ("ssh-cidr", Some("198.51.100.0/24".into()))]),
            &Prompter { interactive: false },
        )
        .unwrap();
        let r = resources(&s);
        assert_eq!(r.len(), 5);
        assert!(r[0].detail.contains("22 from 198.51.100.0/24"));
        assert!(r.iter().any(|x| x.kind == "volume" && x.detail.contains("encrypted")));
        assert_eq!(r[2].name, "sourcegraph-box", "named as the provider names it");
    }
}
