//! `sgbox logs [SERVICE]`: compose logs of the box's services, or the first boot's cloud-init log.

use anyhow::Result;

use super::boxctl;
use super::Context;
use crate::cli::LogsArgs;
use crate::error::UserError;
use crate::onbox;
use crate::render::PROJECT;

pub fn run(ctx: &Context, args: LogsArgs) -> Result<u8> {
    let rt = boxctl::runtime()?;
    let code = rt.block_on(async {
        let mut d = boxctl::open(ctx, &args.target).await?;
        let cmd = match args.service.as_deref() {
            Some("cloud-init") => format!("sudo tail -n {}{} /var/log/cloud-init-output.log", args.tail, if args.follow { " -f" } else { "" }),
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
                    other.map(onbox::quote).unwrap_or_default()
                )
            }
        };
        boxctl::stream(&mut d, args.target.reach.insecure_accept_host_key, cmd, None).await
    })?;
    Ok(code.clamp(0, 255) as u8)
}
