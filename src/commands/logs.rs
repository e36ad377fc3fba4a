//! `sgbox logs [SERVICE]`: compose logs of the box's services, or the first boot's cloud-init log.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::boxctl;
use super::Context;
use crate::cli::LogsArgs;
use crate::error::UserError;
use crate::readiness::PROJECT;

pub fn run(ctx: &Context, args: LogsArgs) -> Result<()> {
    let rt = boxctl::runtime()?;
    let code = rt.block_on(async {
        let mut d = boxctl::open(ctx, &args.target)?;
        let cmd = match args.service.as_deref() {
            Some("cloud-init") => format!("sudo tail -n {} {} /var/log/cloud-init-output.log", args.tail, if args.follow { "-f" } else { "" }),
            other => {
                if let Some(s) = other {
                    if !d.settings.release().services.contains_key(s) {
                        let known: Vec<&str> = d.settings.release().services.keys().map(String::as_str).collect();
                        return Err(UserError::field("SERVICE", format!("'{s}' is not a service of this box"))
                            .hint(format!("use cloud-init or one of: {}", known.join(", ")))
                            .into());
                    }
                }
                format!(
                    "sudo docker compose --ansi never -p {PROJECT} logs --no-color --tail {}{} {}",
                    args.tail,
                    if args.follow { " --follow" } else { "" },
                    other.unwrap_or("")
                )
            }
        };
        let ep = boxctl::running_endpoint(&d).await?;
        let s = boxctl::connect(ctx, &mut d, &ep, args.target.reach.insecure_accept_host_key, Instant::now() + Duration::from_secs(30)).await?;
        let status = tokio::task::spawn_blocking(move || s.stream_blocking(&cmd, &mut std::io::stdout(), &mut std::io::stderr()))
            .await
            .expect("ssh task")
            .context("reading logs on the box")?;
        Ok::<i32, anyhow::Error>(status)
    })?;
    drop(rt);
    if code != 0 {
        std::process::exit(code.clamp(1, 255));
    }
    Ok(())
}
