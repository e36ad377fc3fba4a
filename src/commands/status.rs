//! `sgbox status`: the box's machine state, address and release, and over SSH (when reachable)
//! the health of every compose service and what `/__version` answers.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use super::boxctl;
use super::Context;
use crate::cli::TargetArgs;
use crate::cloud::InstanceState;
use crate::output;
use crate::stack::readiness;

pub fn run(ctx: &Context, args: TargetArgs) -> Result<()> {
    boxctl::runtime()?.block_on(status(ctx, args))
}

async fn status(ctx: &Context, args: TargetArgs) -> Result<()> {
    let mut d = boxctl::open(ctx, &args).await?;
    let state = d.machine.state().await?;
    let resources = d.machine.resources().await?;
    let ep = d.machine.endpoint().await?;
    let release = d.record.as_ref().map(|r| r.release.to_string());
    let mut services = None;
    let mut answers = None;
    let mut ssh_error = None;
    let mut data_disk_mounted = None;
    if let (InstanceState::Running, Some(ep)) = (&state, &ep) {
        match boxctl::connect(&mut d, ep, args.reach.insecure_accept_host_key, Instant::now() + Duration::from_secs(8)).await {
            Ok(s) => {
                match s.exec(&readiness::services_cmd()).await {
                    Ok(o) if o.status == 0 => services = Some(readiness::parse_services(&o.stdout)),
                    Ok(o) => ssh_error = Some(format!("listing the containers: {}", o.stderr.trim())),
                    Err(e) => ssh_error = Some(e.to_string()),
                }
                // Docker refuses to start without its data disk: say so, not only "unhealthy".
                if let Ok(o) = s.exec(&format!("mountpoint -q {}", crate::render::DATA_MOUNT)).await {
                    data_disk_mounted = Some(o.status == 0);
                }
                let cmd = readiness::version_cmd(&d.settings.tls, d.settings.hostname.as_deref());
                answers = Some(readiness::version_on_box(&s, &cmd).await);
            }
            // Without SSH, the address from here (plain HTTP only says something without TLS).
            Err(e) => {
                ssh_error = Some(format!("{e:#}"));
                answers = Some(readiness::version(&ep.url()).await);
            }
        }
    }
    let expected: Vec<String> = d.settings.release().services.keys().cloned().collect();
    let unhealthy = services.as_ref().map(|s| readiness::not_ready(&expected, s));
    let healthy = matches!(&answers, Some(Ok(v)) if Some(v) == release.as_ref())
        && unhealthy.as_ref().is_some_and(|u| u.is_empty())
        && data_disk_mounted != Some(false);

    if output::json() {
        return output::result_json(json!({
            "name": d.settings.name,
            "cloud": d.settings.cloud.to_string(),
            "state": state,
            "release": release,
            "url": ep.as_ref().map(|e| e.site_url(&d.settings.tls, d.settings.hostname.as_deref())),
            "endpoint": ep,
            "healthy": healthy,
            "version_answer": answers.as_ref().map(|a| a.clone().unwrap_or_else(|e| format!("error: {e}"))),
            "services": services,
            "unhealthy": unhealthy,
            "ssh_error": ssh_error,
            "data_disk_mounted": data_disk_mounted,
            "resources": resources,
            "state_dir": d.dir.path,
        }));
    }
    println!("{} ({}): {}", d.settings.name, d.settings.cloud, serde_json::to_value(&state)?.as_str().unwrap_or("?"));
    if let Some(r) = &release {
        println!("  release:  {r}");
    }
    if let Some(ep) = &ep {
        println!("  url:      {}", ep.site_url(&d.settings.tls, d.settings.hostname.as_deref()));
        println!("  ssh:      sgbox ssh --name {}  ({}:{})", d.settings.name, ep.host, ep.ssh_port);
    }
    match &answers {
        Some(Ok(v)) => println!("  /__version: {v}"),
        Some(Err(e)) => println!("  /__version: not answering ({e})"),
        None => {}
    }
    if let Some(s) = &services {
        let bad = unhealthy.clone().unwrap_or_default();
        println!(
            "  services: {}/{} healthy{}",
            expected.len() - bad.len(),
            expected.len(),
            if bad.is_empty() { String::new() } else { format!("; not healthy: {}", bad.join(", ")) }
        );
        if output::verbose() > 0 {
            for x in s {
                println!("    {:<36} {:<10} {}", x.service, x.state, x.health);
            }
        }
    }
    if data_disk_mounted == Some(false) {
        output::warn(format!(
            "the data disk is not mounted on {}: Docker does not start without it (nothing is written to the root disk); run `sgbox up --name {}` to mount it",
            crate::render::DATA_MOUNT,
            d.settings.name
        ));
    }
    if let Some(e) = &ssh_error {
        println!("  ssh:      {e}");
    }
    for r in &resources {
        println!("  {:<14} {}{}", r.kind, r.id, if r.kept_by_default { "  (kept by down)" } else { "" });
    }
    println!("  state:    {}", d.dir.path.display());
    Ok(())
}
