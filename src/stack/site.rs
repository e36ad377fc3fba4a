//! The first site admin. A new Sourcegraph lets its first visitor create the site-admin account,
//! so `up` claims the site itself, from inside the box, through Sourcegraph's own endpoint:
//! `POST /-/site-init` with `{"email","username","password"}` (JSON; 200 when created, 500
//! "Signup failed unexpectedly." once the site has an admin, 409 for a password shorter than 12).
//! The credentials are generated and saved in the state folder (0600) before the call, travel on
//! stdin (never in a command line), and are shown only by `sgbox admin`.
//!
//! When the site turns out to be claimed already, `POST /-/sign-in` with the saved credentials
//! tells a claim of ours (an interrupted earlier run) from somebody else's.

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::onbox::{quote, Session};
use crate::output;
use crate::state::{now_rfc3339, DeploymentDir};

/// The frontend's container and port on the compose network.
const FRONTEND: &str = "sourcegraph-frontend-0";
const FRONTEND_PORT: u16 = 3080;

#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// sgbox created the site admin now.
    Created,
    /// The site admin is the one sgbox created earlier.
    Ours,
}

/// The frontend's address on the compose network, from the Docker API (it answers whatever the
/// TLS mode: Caddy in front serves only the hostname once TLS is on).
async fn frontend_url(on: &Session) -> Result<String> {
    let out = on.run(&format!("sudo curl -sSf --unix-socket /run/docker.sock http://docker/containers/{FRONTEND}/json")).await?;
    let v: Value = serde_json::from_str(&out).context("reading the frontend container from the Docker API")?;
    let ip = v["NetworkSettings"]["Networks"]
        .as_object()
        .and_then(|n| n.values().find_map(|x| x["IPAddress"].as_str().filter(|s| !s.is_empty())))
        .context("the frontend container has no address on the compose network")?;
    Ok(format!("http://{ip}:{FRONTEND_PORT}"))
}

/// POST `body` (on stdin) to `url` from the box: (HTTP status, response body).
async fn post(on: &Session, url: &str, body: &Value) -> Result<(u16, String)> {
    let cmd = format!("curl -sS -X POST -H 'Content-Type: application/json' --data-binary @- -w '\\n%{{http_code}}' {}", quote(url));
    let out = on.run_input(&cmd, body.to_string().as_bytes()).await?;
    let (text, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    let code: u16 = code.trim().parse().with_context(|| format!("no HTTP status from {url}: {out}"))?;
    Ok((code, text.to_string()))
}

/// Make sure the site's admin is sgbox's: create it, or recognise it.
pub async fn claim(on: &Session, dir: &DeploymentDir, name: &str) -> Result<Claim> {
    let mut admin = dir.admin_or_new(name)?;
    if admin.claimed_at.is_some() {
        return Ok(Claim::Ours);
    }
    let base = frontend_url(on).await?;
    let (code, text) =
        post(on, &format!("{base}/-/site-init"), &json!({ "email": admin.email, "username": admin.username, "password": admin.password })).await?;
    let claim = match code {
        200 => Claim::Created,
        // Already initialized. Ours, from a run that stopped before it heard back?
        500 => {
            let (code, _) = post(on, &format!("{base}/-/sign-in"), &json!({ "email": admin.username, "password": admin.password })).await?;
            if code != 200 {
                bail!(
                    "the site already has an admin that sgbox did not create: somebody reached it first. Treat the box as compromised: `sgbox down --name {name} --delete-data` and `up` again (the firewall admits only --web-cidr until you open it)"
                );
            }
            Claim::Ours
        }
        _ => bail!("creating the site admin: POST /-/site-init answered {code}: {}", text.trim()),
    };
    admin.claimed_at = Some(now_rfc3339());
    dir.save_admin(&admin)?;
    output::detail(format!("site admin {} claimed ({:?}); credentials in {}", admin.username, claim, dir.admin_path().display()));
    Ok(claim)
}
