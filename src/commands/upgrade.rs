//! `sgbox upgrade` and `sgbox rollback`: parse, open the deployment (its record is the truth),
//! reach the box, confirm, print. The work itself is the stack's upgrade engine
//! ([`crate::stack::upgrade`]), which the journal on the box drives.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use super::boxctl::{self, parse_duration};
use super::Context;
use crate::cli::{RollbackArgs, UpgradeArgs};
use crate::error::UserError;
use crate::output;
use crate::release::catalog::catalog;
use crate::release::planner::{self, PlanRequest, UpgradeKind, UpgradePlan};
use crate::release::version::VersionSpec;
use crate::stack::journal::{Journal, Status, PATH_ON_BOX};
use crate::stack::upgrade::{self as engine, describe, disk_needed, gib, Probe, Upgrade};
use crate::state::{now_rfc3339, whoami, HistoryEntry};

/// Reach the box of the deployment `target` names, for an upgrade or a rollback.
async fn reach(ctx: &Context, target: &crate::cli::TargetArgs, timeout: Duration, step_limit: Duration, what: &str) -> Result<Upgrade> {
    let mut d = boxctl::open(ctx, target).await?;
    if d.record.is_none() {
        return Err(UserError::field("name", format!("no deployment named \"{}\" to {what}", d.settings.name))
            .hint("check --name and --state-dir")
            .into());
    }
    let insecure = target.reach.insecure_accept_host_key;
    // A restore that stopped the box and failed before starting it leaves it stopped, and the
    // journal that says what to do next is on the box: start it first.
    if d.machine.state().await? == crate::cloud::InstanceState::Stopped {
        output::note(format!("the box \"{}\" is stopped; starting it to {what}", d.settings.name));
        d.machine.start(timeout).await?;
    }
    let ep = boxctl::running_endpoint(&d).await?;
    let on = boxctl::connect(&mut d, &ep, insecure, Instant::now() + Duration::from_secs(60)).await?;
    Ok(Upgrade { d, on, ep, timeout, step_limit, insecure })
}

pub fn run(ctx: &Context, args: UpgradeArgs) -> Result<()> {
    if output::json() && !ctx.yes && !args.dry_run {
        return Err(UserError::field("output", "json output never prompts, so `upgrade` needs --yes with it").hint("add --yes").into());
    }
    let timeout = parse_duration("timeout", &args.timeout)?;
    let step_limit = parse_duration("step-limit", &args.step_limit)?;
    let to_spec = match &args.to {
        Some(t) => Some(
            t.parse::<VersionSpec>()
                .map_err(|e| UserError::field("to", format!("'{t}' is not a release: {e}")).hint("write it like 7.5.4453, 7.5 or latest"))?,
        ),
        None => None,
    };
    boxctl::runtime()?.block_on(async move {
        let mut s = reach(ctx, &args.target, timeout, step_limit, "upgrade").await?;
        let _lock = if args.dry_run { None } else { Some(s.d.dir.lock("upgrade")?) };
        let lease = if args.dry_run { None } else { Some(s.lease("upgrade", args.break_lock).await?) };
        let r = upgrade_holding(ctx, &args, &mut s, to_spec).await;
        if let Some(l) = lease {
            l.release(&s.on).await;
        }
        r
    })
}

async fn upgrade_holding(ctx: &Context, args: &UpgradeArgs, s: &mut Upgrade, to_spec: Option<VersionSpec>) -> Result<()> {
    {
        let from = s.d.record.as_ref().map(|r| r.release).expect("reach checks the record");
        let to = match to_spec {
            Some(spec) => catalog().resolve(spec).map_err(|e| UserError { field: Some("to".into()), ..e })?.version,
            None => catalog().latest().version,
        };

        // An unfinished upgrade resumes as it was journaled, before anything is planned anew.
        if let Some(j) = s.read_journal().await?.filter(Journal::open) {
            if args.to.is_some() && j.to != to {
                return Err(UserError::field("to", format!("an upgrade {} -> {} is still in progress on this box", j.from, j.to))
                    .hint(format!("run `sgbox upgrade --name {}` to finish it, or `sgbox rollback` to undo it", s.d.settings.name))
                    .into());
            }
            if args.dry_run {
                let replanned = planner::plan(catalog(), PlanRequest { from: j.from, to: j.to, postgres_major: None, allow_downgrade: true }).ok();
                return print_plan(&s.d.settings.name, &j, replanned.as_ref(), None, true, s.step_limit);
            }
            output::note(format!("resuming the upgrade {} -> {} started {} by {}", j.from, j.to, j.started_at, j.started_by));
            let started = Instant::now();
            let j = engine::drive(s, j).await?;
            return print_done(s, &j, started).await;
        }

        let plan = planner::plan(catalog(), PlanRequest { from, to, postgres_major: None, allow_downgrade: args.allow_downgrade })?;
        if plan.kind == UpgradeKind::None {
            if output::json() {
                return output::result_json(
                    json!({ "name": s.d.settings.name, "from": from.to_string(), "to": to.to_string(), "kind": "none", "changed": false }),
                );
            }
            println!("The box \"{}\" already runs {to}; nothing to do.", s.d.settings.name);
            return Ok(());
        }

        let probe = engine::preflight(s, &plan, from).await;
        if args.dry_run {
            return print_plan(&s.d.settings.name, &Journal::new("dry-run", &plan), Some(&plan), Some(&probe), false, s.step_limit);
        }
        let probe = probe?;
        confirm(ctx, s, &plan)?;

        let started = Instant::now();
        let mut j = Journal::new(format!("{}-{}-{}", from, to, now_rfc3339().replace([':', '-'], "")), &plan);
        j.started_at = now_rfc3339();
        j.started_by = whoami();
        // Keep the previous upgrade's journal for the record.
        s.on.run(&format!(
            "sudo sh -c 'test -f {PATH_ON_BOX} && install -d /var/lib/sgbox/upgrades && mv {PATH_ON_BOX} /var/lib/sgbox/upgrades/$(date -u +%Y%m%dT%H%M%SZ).json || true'"
        ))
        .await?;
        j.mark(0, Status::Done, &now_rfc3339(), Some(format!("free {} of {} needed", gib(probe.avail), gib(disk_needed(&plan, &probe)))));
        s.save_journal(&j).await?;
        let j = engine::drive(s, j).await?;
        print_done(s, &j, started).await
    }
}

async fn print_done(s: &Upgrade, j: &Journal, started: Instant) -> Result<()> {
    // The retention rule: the newest snapshots stay (this upgrade's is the rollback point).
    let pruned = match super::snapshots::prune(s.d.machine.as_ref(), super::snapshots::KEEP_AFTER_UPGRADE, false).await {
        Ok(gone) => gone,
        Err(e) => {
            output::warn(format!("the upgrade is done, but older snapshots could not be pruned: {e:#}"));
            vec![]
        }
    };
    if !pruned.is_empty() {
        output::note(format!(
            "deleted {} older data snapshot(s), keeping the newest {}: {}",
            pruned.len(),
            super::snapshots::KEEP_AFTER_UPGRADE,
            pruned.join(", ")
        ));
    }
    let secs = started.elapsed().as_secs_f64();
    if output::json() {
        return output::result_json(json!({
            "name": s.d.settings.name, "from": j.from.to_string(), "to": j.to.to_string(), "kind": j.kind,
            "snapshot": j.snapshot, "pruned_snapshots": pruned, "journal": j.id, "url": s.ep.site_url(&s.d.settings.tls, s.d.settings.hostname.as_deref()), "seconds": (secs * 10.0).round() / 10.0,
        }));
    }
    println!(
        "Sourcegraph {} -> {} on \"{}\": done and verified: {}",
        j.from,
        j.to,
        s.d.settings.name,
        s.ep.site_url(&s.d.settings.tls, s.d.settings.hostname.as_deref())
    );
    if let Some(sn) = &j.snapshot {
        println!("  pre-upgrade snapshot: {sn} (`sgbox rollback --name {}` restores it)", s.d.settings.name);
    }
    output::note(format!("took {}", humantime::format_duration(Duration::from_secs(secs as u64))));
    Ok(())
}

/// `--dry-run`: the journal's steps (those done marked, when resuming), the plan's downtime and
/// notes, and what preflight found.
fn print_plan(
    name: &str,
    j: &Journal,
    plan: Option<&UpgradePlan>,
    probe: Option<&Result<Probe>>,
    resuming: bool,
    step_limit: Duration,
) -> Result<()> {
    let steps: Vec<String> = j.steps.iter().map(|e| describe(&e.step, j)).collect();
    let downtime = plan.map(|p| p.downtime).unwrap_or("as planned when the upgrade started");
    let notes: &[String] = plan.map(|p| p.notes.as_slice()).unwrap_or_default();
    if output::json() {
        let check = match (probe, plan) {
            (Some(Ok(p)), Some(plan)) => {
                json!({ "ok": true, "free_bytes": p.avail, "needed_bytes": disk_needed(plan, p), "new_images": p.images_missing, "database_bytes": p.db_bytes })
            }
            (Some(Err(e)), _) => json!({ "ok": false, "error": format!("{e:#}") }),
            _ => Value::Null,
        };
        return output::result_json(json!({
            "name": name,
            "dry_run": true,
            "from": j.from.to_string(),
            "to": j.to.to_string(),
            "kind": j.kind,
            "downtime": downtime,
            "snapshot": "the data disk, before anything changes",
            "steps": steps,
            "resuming": resuming.then(|| j.id.clone()),
            "step_limit_seconds": step_limit.as_secs(),
            "preflight": check,
            "notes": notes,
        }));
    }
    print!("{}", plan_text(name, j, downtime, notes, probe.zip(plan), step_limit));
    Ok(())
}

fn plan_text(
    name: &str,
    j: &Journal,
    downtime: &str,
    notes: &[String],
    probe: Option<(&Result<Probe>, &UpgradePlan)>,
    step_limit: Duration,
) -> String {
    let mut out = String::new();
    let kind = serde_json::to_value(j.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    out.push_str(&format!("Upgrade plan for \"{name}\": {} -> {} ({kind})\n", j.from, j.to));
    out.push_str(&format!("downtime: {downtime}\n"));
    out.push_str("snapshot: the data disk, before anything changes (rollback restores it if migrations ran)\n");
    out.push_str(&format!(
        "step limit: {} per step on the box (--step-limit), apart from how long sgbox waits\n",
        humantime::format_duration(step_limit)
    ));
    for (i, e) in j.steps.iter().enumerate() {
        let done = if e.status == Status::Done { "  [done]" } else { "" };
        out.push_str(&format!("  {}. {}{done}\n", i + 1, describe(&e.step, j)));
    }
    for n in notes {
        out.push_str(&format!("note: {n}\n"));
    }
    match probe {
        Some((Ok(p), plan)) => out.push_str(&format!(
            "preflight: ok ({} free, about {} needed, {} images to pull)\n",
            gib(p.avail),
            gib(disk_needed(plan, p)),
            p.images_missing
        )),
        Some((Err(e), _)) => out.push_str(&format!("preflight: would refuse: {e:#}\n")),
        None => {}
    }
    out.push_str("Nothing was changed (--dry-run).\n");
    out
}

fn confirm(ctx: &Context, s: &Upgrade, plan: &UpgradePlan) -> Result<()> {
    if ctx.yes {
        return Ok(());
    }
    let kind = serde_json::to_value(plan.kind)?.as_str().unwrap_or("").to_string();
    boxctl::confirm(
        UserError::new(format!("`upgrade` changes the box \"{}\" and needs confirmation", s.d.settings.name))
            .hint("pass --yes to confirm without a terminal (see the plan with --dry-run)"),
        || eprintln!("Upgrade \"{}\" from {} to {} ({kind}). Downtime: {}.", s.d.settings.name, plan.from, plan.to, plan.downtime),
        "nothing was changed",
    )
}

/// `sgbox rollback`: back to the release and data of before the last upgrade.
pub fn rollback(ctx: &Context, args: RollbackArgs) -> Result<()> {
    if output::json() && !ctx.yes {
        return Err(UserError::field("output", "json output never prompts, so `rollback` needs --yes with it").hint("add --yes").into());
    }
    let timeout = parse_duration("timeout", &args.timeout)?;
    boxctl::runtime()?.block_on(async move {
        // A rollback's steps (stop, restore, start) are short; its limit is the wait's.
        let mut s = reach(ctx, &args.target, timeout, timeout.max(Duration::from_secs(3600)), "roll back").await?;
        let _lock = s.d.dir.lock("rollback")?;
        let lease = s.lease("rollback", args.break_lock).await?;
        let r = rollback_holding(ctx, &mut s).await;
        lease.release(&s.on).await;
        r
    })
}

async fn rollback_holding(ctx: &Context, s: &mut Upgrade) -> Result<()> {
    {
        let Some(mut j) = s.read_journal().await? else {
            return Err(UserError::new(format!("the box \"{}\" has no upgrade to roll back", s.d.settings.name)).hint("see `sgbox history`").into());
        };
        if j.outcome.as_deref() == Some("rolled-back") {
            return Err(UserError::new(format!("the last upgrade ({} -> {}) was already rolled back", j.from, j.to))
                .hint("see `sgbox history`")
                .into());
        }
        if j.snapshot.is_none() {
            return Err(UserError::new(format!("the upgrade {} -> {} has no snapshot to restore", j.from, j.to)).into());
        }
        if !ctx.yes {
            boxctl::confirm(
                UserError::new("`rollback` replaces the box's data with its pre-upgrade snapshot and needs confirmation")
                    .hint("pass --yes to confirm without a terminal"),
                || {
                    eprintln!(
                        "Roll \"{}\" back from {} to {}: the data disk returns to snapshot {} (changes since are lost).",
                        s.d.settings.name,
                        j.to,
                        j.from,
                        j.snapshot.as_deref().unwrap_or("")
                    )
                },
                "nothing was changed",
            )?;
        }
        let undo = j.undo_plan();
        engine::undo_steps(s, &undo).await?;
        j.outcome = Some("rolled-back".into());
        s.save_journal(&j).await?;
        let entry = HistoryEntry { at: now_rfc3339(), action: "rollback".into(), release: j.from, from: Some(j.to), by: whoami() };
        engine::record(s, entry, j.from).await?;
        if output::json() {
            return output::result_json(
                json!({ "name": s.d.settings.name, "release": j.from.to_string(), "from": j.to.to_string(), "snapshot": j.snapshot }),
            );
        }
        println!(
            "\"{}\" is back at {} (snapshot {}), verified: {}",
            s.d.settings.name,
            j.from,
            j.snapshot.as_deref().unwrap_or(""),
            s.ep.site_url(&s.d.settings.tls, s.d.settings.hostname.as_deref())
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dry_run_of_a_multi_version_upgrade_reads_as_reviewed() {
        let plan = planner::plan(
            catalog(),
            PlanRequest { from: "5.9.17785".parse().unwrap(), to: "7.5.4453".parse().unwrap(), postgres_major: None, allow_downgrade: false },
        )
        .unwrap();
        let mut j = Journal::new("dry-run", &plan);
        j.mark(0, Status::Done, "2026-12-01T10:00:00Z", None);
        let probe = Ok(Probe { avail: 40 << 30, image_bytes: 3 << 30, images_missing: 31, db_bytes: 1 << 30, errors: vec![] });
        insta::assert_snapshot!(plan_text("eval", &j, plan.downtime, &plan.notes, Some((&probe, &plan)), Duration::from_secs(12 * 3600)));
    }
}
