//! `sgbox versions` and `sgbox versions path`: the release catalog and the upgrade planner.

use anyhow::Result;
use serde_json::json;

use super::Context;
use crate::cli::{VersionsArgs, VersionsCommand};
use crate::error::UserError;
use crate::output;
use crate::release::catalog::catalog;
use crate::release::planner::{self, PlanRequest, UpgradeKind};
use crate::release::version::{Version, VersionSpec};

pub fn run(ctx: &Context, args: VersionsArgs) -> Result<()> {
    match args.command {
        None => list(ctx),
        Some(VersionsCommand::Path { from, to, postgres, allow_downgrade }) => path(ctx, &from, &to, postgres, allow_downgrade),
    }
}

fn list(_ctx: &Context) -> Result<()> {
    let c = catalog();
    let rows: Vec<_> = c
        .all()
        .map(|r| {
            let newest = c.latest_of_minor(r.version.major, r.version.minor).map(|n| n.version) == Some(r.version);
            let registries: std::collections::BTreeSet<&str> = r.services.values().map(|i| i.registry.as_str()).collect();
            (r, newest, registries)
        })
        .collect();
    if output::json() {
        let releases: Vec<_> = rows
            .iter()
            .map(|(r, newest, regs)| {
                json!({
                    "version": r.version,
                    "services": r.services.keys().collect::<Vec<_>>(),
                    "postgres": r.postgres_major(),
                    "newest_patch_of_minor": newest,
                    "registries": regs,
                })
            })
            .collect();
        return output::result_json(json!({ "latest": c.latest().version, "releases": releases }));
    }
    println!("{:<12} {:>8} {:>8}  NOTES", "VERSION", "SERVICES", "POSTGRES");
    for (r, newest, regs) in rows.iter().rev() {
        let mut notes = Vec::new();
        if *newest {
            notes.push(format!("newest {}.{}", r.version.major, r.version.minor));
        }
        if r.version == c.latest().version {
            notes.push("latest".to_string());
        }
        if regs.iter().any(|g| *g != "index.docker.io") {
            notes.push(format!("images from {}", regs.iter().copied().collect::<Vec<_>>().join(", ")));
        }
        println!("{:<12} {:>8} {:>8}  {}", r.version.to_string(), r.services.len(), r.postgres_major(), notes.join("; "));
    }
    Ok(())
}

fn path(_ctx: &Context, from: &str, to: &str, postgres: Option<u32>, allow_downgrade: bool) -> Result<()> {
    let c = catalog();
    let from: Version = from.parse().map_err(|e: crate::release::version::ParseVersionError| {
        UserError::field("--from", e.to_string()).hint("give the exact deployed release, e.g. --from 5.9.17785 (see `sgbox versions`)")
    })?;
    let spec: VersionSpec = to.parse().map_err(|e: crate::release::version::ParseSpecError| UserError::field("--to", e.to_string()))?;
    let to = c.resolve(spec).map_err(|e| UserError { field: Some("--to".into()), ..e })?.version;
    let plan = planner::plan(c, PlanRequest { from, to, postgres_major: postgres, allow_downgrade })?;
    if output::json() {
        let mut v = serde_json::to_value(&plan)?;
        if let Some(hops) = v.get_mut("hops").and_then(|h| h.as_array_mut()) {
            for (h, hop) in hops.iter_mut().zip(&plan.hops) {
                h["migrator_args"] = json!(hop.migrator_args(plan.kind == UpgradeKind::Downgrade));
            }
        }
        return output::result_json(v);
    }
    let kind = match plan.kind {
        UpgradeKind::None => "already there",
        UpgradeKind::Standard => "standard upgrade",
        UpgradeKind::MultiVersion => "multi-version upgrade",
        UpgradeKind::Downgrade => "downgrade",
    };
    println!("{} -> {}: {kind}", plan.from, plan.to);
    println!("downtime: {}", plan.downtime);
    if plan.kind == UpgradeKind::Standard {
        println!("  1. render {} and restart; its migrator runs `up` before the new frontend starts", plan.to);
    }
    for (i, h) in plan.hops.iter().enumerate() {
        println!(
            "  {}. migrator {}: {}{}",
            i + 1,
            h.migrator,
            h.migrator_args(plan.kind == UpgradeKind::Downgrade).join(" "),
            if h.postgres_upgrade { format!(" (databases on {} images convert Postgres 12 -> 16)", h.db_images) } else { String::new() }
        );
        println!("     why: {}", h.why);
    }
    if plan.postgres_upgrade {
        println!("disk: the Postgres 16 conversion needs free space of twice the databases' size");
    }
    for n in &plan.notes {
        println!("note: {n}");
    }
    Ok(())
}
