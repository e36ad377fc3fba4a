//! `sgbox down`: find everything the deployment owns (from the cloud's own records, not only
//! local state), show it, confirm, delete it, and report anything that remains. The data disk
//! is kept unless `--delete-data`; with it kept, the deployment's secrets stay too, since the
//! databases on that disk use them.

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::boxctl::{self, parse_duration};
use super::Context;
use crate::cli::DownArgs;
use crate::error::UserError;
use crate::output;

pub fn run(ctx: &Context, args: DownArgs) -> Result<()> {
    if output::json() && !ctx.yes {
        return Err(UserError::field("output", "json output never prompts, so `down` needs --yes with it").hint("add --yes").into());
    }
    let timeout = parse_duration("timeout", &args.timeout)?;
    boxctl::runtime()?.block_on(async {
        let d = boxctl::open(ctx, &args.target).await?;
        let found = d.machine.resources().await?;
        let (doomed, kept): (Vec<_>, Vec<_>) = found.iter().partition(|r| args.delete_data || !r.kept_by_default);
        if found.is_empty() && d.record.is_none() {
            if output::json() {
                return output::result_json(json!({ "name": d.settings.name, "deleted": [], "kept": [], "remaining": [] }));
            }
            println!("Nothing to delete for \"{}\".", d.settings.name);
            return Ok(());
        }
        if !ctx.yes {
            boxctl::confirm(
                UserError::new(format!("`down` deletes the box \"{}\" and needs confirmation", d.settings.name))
                    .hint("pass --yes to confirm without a terminal"),
                || {
                    eprintln!("This deletes the box \"{}\" ({}):", d.settings.name, d.settings.cloud);
                    for r in &doomed {
                        eprintln!("  delete {:<14} {}", r.kind, r.id);
                    }
                    for r in &kept {
                        eprintln!("  keep   {:<14} {}  (pass --delete-data to delete it)", r.kind, r.id);
                    }
                },
                "nothing was deleted",
            )?;
        }
        let _lock = d.dir.lock("down")?;
        let remaining = d.machine.destroy(args.delete_data, timeout).await?;
        if remaining.is_empty() {
            if args.delete_data {
                std::fs::remove_dir_all(&d.dir.path)
                    .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
                    .with_context(|| format!("removing {}", d.dir.path.display()))?;
            } else {
                d.dir.remove_record()?;
            }
        }
        let left = (!remaining.is_empty())
            .then(|| format!("these still exist: {}", remaining.iter().map(|r| format!("{} {}", r.kind, r.id)).collect::<Vec<_>>().join(", ")));
        if output::json() {
            // One document: what was deleted, what remains, and the error if something does.
            output::result_json(json!({ "name": d.settings.name, "deleted": doomed, "kept": kept, "remaining": remaining, "error": left }))?;
        } else {
            for r in &doomed {
                println!("deleted {:<14} {}", r.kind, r.id);
            }
            for r in &kept {
                println!("kept    {:<14} {}", r.kind, r.id);
            }
        }
        if let Some(left) = left {
            bail!(left);
        }
        Ok(())
    })
}
