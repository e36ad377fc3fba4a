//! `sgbox plan`: the resolved settings, machine, release and the resources `up` would create.
//! Offline: it calls no cloud API (the cloud providers add their live view later).

use anyhow::Result;
use serde_json::json;

use super::Context;
use crate::cli::PlanArgs;
use crate::cloud::Spec;
use crate::output;
use crate::settings::{Cloud, Settings, Tls};

pub fn run(ctx: &Context, args: PlanArgs) -> Result<()> {
    let s = ctx.settings(&args.deployment)?;
    if args.print_config {
        print!("{}", s.to_toml());
        return Ok(());
    }
    let release = s.release();
    let m = s.machine();
    let tier = s.size.tier();
    let spec = Spec::of(&s);
    let res = &spec.resources;
    let url = url(&s);
    let cost = cost(&s);
    // The live view: only read calls (resources() lists by tag or by file).
    let live = if args.live {
        let dir = ctx.deployment_dir(&s.name)?;
        let found = super::boxctl::runtime()?.block_on(async {
            let p = crate::cloud::machine(&spec, &dir.path, crate::state::cache_root()?).await?;
            anyhow::Ok(p.resources().await?)
        })?;
        Some(found)
    } else {
        None
    };
    if output::json() {
        return output::result_json(json!({
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
    for line in summary(&s) {
        println!("{line}");
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
    for line in resource_lines(&s) {
        println!("{line}");
    }
    if live.is_some() {
        output::note("(read-only: nothing in the cloud was changed)");
    } else {
        output::note("(offline plan: nothing in the cloud was looked at or changed; --live reads it)");
    }
    Ok(())
}

/// What `up` would make of these settings, for people: the deployment, release, machine, disk,
/// URL, the monthly cost where sgbox knows it, and each resource. (`plan`, and the interactive
/// provisioner before it asks to confirm.)
pub fn summary(s: &Settings) -> Vec<String> {
    let release = s.release();
    let m = s.machine();
    let tier = s.size.tier();
    let url = url(s);
    let cost = cost(s);
    let mut lines = Vec::new();
    lines.push(format!("Deployment   {} on {}{}", s.name, s.cloud, s.region.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()));
    lines.push(format!("Sourcegraph  {} ({} services, Postgres {})", release.version, release.services.len(), release.postgres_major()));
    if s.cloud == Cloud::Local {
        lines.push(format!("Machine      {} (evaluation box)", m.instance_type));
    } else {
        lines.push(format!(
            "Size         {}: up to {} users / {} repos -> {}{}",
            s.size,
            tier.users,
            tier.repos,
            m.instance_type,
            m.vcpus.map(|c| format!(" ({c} vCPU, {} GiB)", m.memory_gib.unwrap_or(0))).unwrap_or_default()
        ));
    }
    lines.push(format!("Data disk    {} GB", s.data_disk_gb));
    lines.push(format!("URL          {url}"));
    if let Some(mirror) = &s.registry_mirror {
        lines.push(format!("Images from  {mirror}"));
    }
    match (&cost, s.cloud) {
        (Some(c), _) => lines.push(format!(
            "Cost         ~${:.0}/month (instance ${:.0} + gp3 ${:.0} + IPv4 ${:.2}; {})",
            c.total, c.instance, c.storage, c.address, c.note
        )),
        (None, Cloud::Aws) => lines.push(format!("Cost         not in sgbox's price table for {} in this region", m.instance_type)),
        _ => {}
    }
    lines
}

/// One line per resource `up` would create.
pub fn resource_lines(s: &Settings) -> Vec<String> {
    Spec::of(s).resources.iter().map(|r| format!("  + {:<15} {:<22} {}", r.kind, r.name, r.detail)).collect()
}

fn url(s: &Settings) -> String {
    match (&s.tls, &s.hostname) {
        (Tls::None, Some(h)) => format!("http://{h}"),
        (Tls::None, None) => "http://<public address>".into(),
        (_, Some(h)) => format!("https://{h}"),
        (_, None) => unreachable!("TLS modes need a hostname"),
    }
}

fn cost(s: &Settings) -> Option<crate::release::pricing::Estimate> {
    match s.cloud {
        Cloud::Aws => crate::release::pricing::aws_monthly(&s.machine().instance_type, s.region.as_deref().unwrap_or("us-east-1"), s.data_disk_gb),
        _ => None,
    }
}
