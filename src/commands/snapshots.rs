//! `sgbox snapshots`: the data snapshots a box keeps (one per upgrade) and the data disks a
//! restore set aside, with `--prune` to delete all but the newest `--keep` snapshots and every
//! set-aside disk. `sgbox upgrade` applies the same rule after a success (it keeps the newest 2),
//! so retained copies do not grow the bill without end.

use anyhow::Result;
use serde_json::json;

use super::boxctl;
use super::Context;
use crate::cli::SnapshotsArgs;
use crate::cloud::{beyond_retention, Machine};
use crate::error::UserError;
use crate::output;

/// Snapshots the retention rule keeps after a successful upgrade.
pub const KEEP_AFTER_UPGRADE: usize = 2;

/// Delete all but the newest `keep` snapshots (and, with `replaced`, every set-aside disk).
/// Returns the ids deleted.
pub async fn prune(m: &dyn Machine, keep: usize, replaced: bool) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    for s in beyond_retention(&m.snapshots().await?, keep) {
        m.delete_snapshot(&s.id).await?;
        gone.push(s.id);
    }
    if replaced {
        for r in m.replaced_disks().await? {
            m.delete_replaced_disk(&r.id).await?;
            gone.push(r.id);
        }
    }
    Ok(gone)
}

pub fn run(ctx: &Context, args: SnapshotsArgs) -> Result<()> {
    if args.prune && !ctx.yes && output::json() {
        return Err(UserError::field("output", "json output never prompts, so `snapshots --prune` needs --yes with it").hint("add --yes").into());
    }
    boxctl::runtime()?.block_on(async {
        let d = boxctl::open(ctx, &args.target).await?;
        if d.record.is_none() {
            return Err(UserError::field("name", format!("no deployment named \"{}\"", d.settings.name)).hint("check --name and --state-dir").into());
        }
        let snaps = d.machine.snapshots().await?;
        let replaced = d.machine.replaced_disks().await?;
        if !args.prune {
            if output::json() {
                return output::result_json(json!({ "name": d.settings.name, "snapshots": snaps, "replaced_disks": replaced }));
            }
            println!("Data snapshots of \"{}\" (oldest first; `sgbox upgrade` keeps the newest {KEEP_AFTER_UPGRADE}):", d.settings.name);
            if snaps.is_empty() {
                println!("  (none)");
            }
            for s in &snaps {
                let size = s.size_gib.map(|g| format!("  {g} GiB")).unwrap_or_default();
                println!("  {}  {}  {}{size}", s.created, s.id, s.label);
            }
            for r in &replaced {
                println!("  set aside by a restore: {} {}  (`--prune` deletes it)", r.kind, r.id);
            }
            return Ok(());
        }
        let doomed = beyond_retention(&snaps, args.keep);
        if !ctx.yes {
            boxctl::confirm(
                UserError::new(format!("`snapshots --prune` deletes data copies of \"{}\" and needs confirmation", d.settings.name))
                    .hint("pass --yes to confirm without a terminal"),
                || {
                    for s in &doomed {
                        eprintln!("  delete snapshot {} ({}, {})", s.id, s.label, s.created);
                    }
                    for r in &replaced {
                        eprintln!("  delete {} {}", r.kind, r.id);
                    }
                },
                "nothing was deleted",
            )?;
        }
        let _lock = d.dir.lock("snapshots --prune")?;
        let gone = prune(d.machine.as_ref(), args.keep, true).await?;
        if output::json() {
            return output::result_json(json!({ "name": d.settings.name, "deleted": gone, "kept": args.keep }));
        }
        for id in &gone {
            println!("deleted {id}");
        }
        if gone.is_empty() {
            println!("Nothing to delete: {} snapshot(s), keeping the newest {}.", snaps.len(), args.keep);
        }
        Ok(())
    })
}
