//! `sgbox up`: create the box (or resume a half-made one) and wait until Sourcegraph answers.
//!
//! Order: check everything that can be checked without side effects (settings, tools, ports)
//! → record the deployment → network, key, image, instance (each idempotent, ids recorded as
//! they exist) → running → SSH with the host key pinned from the console → a custom TLS key
//! sent → cloud-init done → the data disk mounted → every service healthy → `/__version` equals
//! the release → the site admin claimed (nobody else can create it first).

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use super::boxctl::{self, parse_duration, Deployment};
use super::render::bundle_for;
use super::Context;
use crate::cli::UpArgs;
use crate::cloud::{self, InstanceSpec, Spec};
use crate::error::UserError;
use crate::onbox::ssh;
use crate::output::{self, Phase};
use crate::stack::readiness::{self, Deadline};
use crate::state::{cache_root, now_rfc3339, whoami, HistoryEntry, Record};

pub fn run(ctx: &Context, args: UpArgs) -> Result<()> {
    if output::json() && !ctx.yes {
        return Err(UserError::field("output", "json output never prompts, so `up` needs --yes with it").hint("add --yes").into());
    }
    let timeout = parse_duration("timeout", &args.timeout)?;
    let settings = if ctx.interactive() {
        match super::init::interview(ctx, &args.deployment, super::init::Purpose::Up, None)? {
            Some((s, _)) => s,
            None => return Ok(()),
        }
    } else {
        ctx.settings(&args.deployment)?
    };
    boxctl::runtime()?.block_on(up(ctx, settings, args, timeout))
}

async fn up(ctx: &Context, settings: crate::settings::Settings, args: UpArgs, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let deadline = Deadline(started + timeout);
    let dir = ctx.deployment_dir(&settings.name)?;
    let machine = cloud::machine(&Spec::of(&settings), &dir.path, cache_root()?).await?;
    machine.preflight().await?;
    let _lock = dir.lock("up")?;

    let existing = dir.record()?;
    if let Some(r) = &existing {
        if r.cloud != settings.cloud {
            return Err(UserError::field("cloud", format!("\"{}\" is already a {} deployment", settings.name, r.cloud))
                .hint(format!("use --cloud {}, or another --name", r.cloud))
                .into());
        }
        if r.release != settings.version {
            return Err(UserError::field("version", format!("the box \"{}\" runs {}; `up` does not change releases", settings.name, r.release))
                .hint(format!("run `sgbox upgrade --to {}`, or keep version = {}", settings.version, r.release))
                .into());
        }
    }

    // A data disk kept by `down` holds its release's databases: `up` starts that release on it,
    // and the upgrade to another one is `sgbox upgrade`'s (snapshot first, rolled back on failure).
    if existing.is_none() {
        if let Some(k) = machine.kept_data_disk().await? {
            match k.release {
                Some(r) if r != settings.version => {
                    return Err(UserError::field(
                        "version",
                        format!("the data disk {} that \"{}\" kept holds Sourcegraph {r}'s databases; `up` does not change releases", k.id, settings.name),
                    )
                    .hint(format!(
                        "run `sgbox up --name {n} --version {r}`, then `sgbox upgrade --name {n} --to {v}{back}`; or start afresh: `sgbox down --name {n} --delete-data`",
                        n = settings.name,
                        v = settings.version,
                        back = if settings.version < r { " --allow-downgrade" } else { "" }
                    ))
                    .into());
                }
                Some(_) => output::detail(format!("starting on the kept data disk {}", k.id)),
                None => output::detail(format!("starting on the kept data disk {} (its release is not recorded; the box checks it)", k.id)),
            }
        }
    }

    // Secrets, key and user-data are generated once and reused: a re-run renders the same box.
    let bundle = bundle_for(ctx, &settings)?;
    if let Some(p) = &settings.compose_override {
        if existing.is_some() {
            output::warn(format!(
                "--compose-override {} is for a new box: \"{}\" exists, and the docker-compose.override.yaml on it is yours (edit it there: `sgbox ssh --name {} -- sudoedit /opt/sgbox/docker-compose.override.yaml`)",
                p.display(),
                settings.name,
                settings.name
            ));
        } else if settings.cloud == crate::settings::Cloud::Aws && bundle.user_data.len() > crate::render::AWS_USER_DATA_LIMIT {
            return Err(UserError::field(
                "compose-override",
                format!(
                    "with {} the user-data comes to {} bytes; EC2 accepts {}",
                    p.display(),
                    bundle.user_data.len(),
                    crate::render::AWS_USER_DATA_LIMIT
                ),
            )
            .hint("shorten the override, or put it on the box after `up` (sgbox ssh -- sudo tee /opt/sgbox/docker-compose.override.yaml)")
            .into());
        }
    }
    let public_key = dir.ssh_public_key()?;
    let mut record = existing.unwrap_or_else(|| Record {
        format: 1,
        name: settings.name.clone(),
        cloud: settings.cloud,
        release: settings.version,
        settings: settings.to_toml(),
        created_at: now_rfc3339(),
        instance_id: None,
        host_key: None,
        url: None,
        history: vec![],
    });
    dir.save_record(&record)?;

    let mut timings = serde_json::Map::new();
    let mut step = |name: &str, secs: f64| {
        timings.insert(name.to_string(), json!((secs * 10.0).round() / 10.0));
    };

    let p = Phase::start("network");
    machine.ensure_network().await?;
    step("network", p.done());
    let p = Phase::start("ssh key");
    machine.ensure_key(&public_key).await?;
    step("key", p.done());
    let p = Phase::start("base image");
    let image = machine.find_base_image().await?;
    step("image", p.done_with(&image.description));

    let p = Phase::start("machine");
    let spec = InstanceSpec { user_data: &bundle.user_data };
    let id = machine.create_instance(&image, &spec).await?;
    record.instance_id = Some(id.clone());
    dir.save_record(&record)?;
    let ep = machine.wait_running(timeout).await?;
    record.url = Some(ep.site_url(&settings.tls, settings.hostname.as_deref()));
    dir.save_record(&record)?;
    step("machine", p.done_with(&id));

    let mut d = Deployment { settings, dir, record: Some(record), machine };
    let target = ssh::Target { host: ep.host.clone(), port: ep.ssh_port, key: d.dir.ssh_private_key_path() };
    let ssh_cmd = ssh::command_line(&target, &d.dir.known_hosts_path());

    if !args.no_wait {
        let p = Phase::start("ssh (host key checked against the console)");
        let box_ssh = match boxctl::connect(&mut d, &ep, args.reach.insecure_accept_host_key, deadline.0).await {
            Ok(s) => s,
            Err(e) => {
                p.fail();
                return Err(e.context(d.machine.console_hint()));
            }
        };
        step("ssh", p.done());
        if matches!(d.settings.tls, crate::settings::Tls::Custom { .. }) {
            let p = Phase::start("TLS certificate and key (over SSH)");
            crate::deployment::send_tls(&box_ssh, &d.settings).await?;
            p.done();
        }

        let p = Phase::start("cloud-init");
        match readiness::cloud_init(&box_ssh, &deadline, &p).await {
            Ok(()) => step("cloud_init", p.done()),
            Err(e) => {
                p.fail();
                // A boot script that found no data disk fails cloud-init; the disk may be there now.
                if readiness::data_disk(&box_ssh).await.is_err() {
                    eprint!("{}", readiness::diagnostics(&box_ssh, &[]).await);
                    return Err(e);
                }
                output::warn(format!("cloud-init had failed ({e:#}); the data disk is mounted now, so the box goes on"));
            }
        }
        readiness::data_disk(&box_ssh).await?;

        let release = d.settings.release();
        let expected: Vec<String> = release.services.keys().cloned().collect();
        let p = Phase::start("services");
        if let Err((msg, failing)) = readiness::services(&box_ssh, &expected, &deadline, &p).await {
            p.fail();
            eprint!("{}", readiness::diagnostics(&box_ssh, &failing).await);
            anyhow::bail!("{msg}: {}", failing.join(", "));
        }
        step("services", p.done_with(&format!("{} services healthy", expected.len())));

        let p = Phase::start("sourcegraph answers");
        let cmd = readiness::version_cmd(&d.settings.tls, d.settings.hostname.as_deref());
        if let Err(e) = readiness::answers(&box_ssh, &cmd, &d.settings.version.to_string(), &deadline, &p).await {
            p.fail();
            eprint!("{}", readiness::diagnostics(&box_ssh, &["caddy".into(), "sourcegraph-frontend-0".into()]).await);
            return Err(e);
        }
        step("version", p.done_with(&format!("/__version = {}", d.settings.version)));

        let p = Phase::start("site admin");
        match crate::stack::site::claim(&box_ssh, &d.dir, &d.settings.name).await {
            Ok(c) => step("site_admin", p.done_with(if c == crate::stack::site::Claim::Created { "created" } else { "already sgbox's" })),
            Err(e) => {
                p.fail();
                return Err(e);
            }
        }

        let rec = d.record.as_mut().expect("record saved above");
        if rec.history.is_empty() {
            rec.history.push(HistoryEntry { at: now_rfc3339(), action: "up".into(), release: rec.release, from: None, by: whoami() });
            d.dir.save_record(rec)?;
        }
    }

    let total = started.elapsed().as_secs_f64();
    let admin = d.dir.admin()?;
    let rec = d.record.as_ref().expect("record");
    let fingerprint = rec.host_key.as_deref().and_then(|k| crate::onbox::hostkeys::fingerprint(k).ok());
    if output::json() {
        return output::result_json(json!({
            "name": d.settings.name,
            "cloud": d.settings.cloud.to_string(),
            "release": rec.release,
            "ready": !args.no_wait,
            "instance_id": id,
            "url": ep.site_url(&d.settings.tls, d.settings.hostname.as_deref()),
            "ssh": { "host": ep.host, "port": ep.ssh_port, "user": ssh::USER, "key": target.key, "command": ssh_cmd, "host_key_fingerprint": fingerprint },
            "ports": { "ssh": ep.ssh_port, "http": ep.http_port, "https": ep.https_port },
            "state_dir": d.dir.path,
            "admin": admin.as_ref().map(|a| json!({ "username": a.username, "email": a.email, "claimed": a.claimed_at.is_some(), "show": format!("sgbox admin --name {}", d.settings.name) })),
            "seconds": (total * 10.0).round() / 10.0,
            "timings": timings,
        }));
    }
    if args.no_wait {
        println!(
            "The box \"{}\" is running (not waiting for Sourcegraph): {}",
            d.settings.name,
            ep.site_url(&d.settings.tls, d.settings.hostname.as_deref())
        );
    } else {
        println!("Sourcegraph {} is ready: {}", rec.release, ep.site_url(&d.settings.tls, d.settings.hostname.as_deref()));
    }
    if let Some(a) = admin.as_ref().filter(|a| a.claimed_at.is_some()) {
        println!("  admin: {} (password: `sgbox admin --name {}`)", a.username, d.settings.name);
    }
    println!("  ssh:   sgbox ssh --name {}   (or: {ssh_cmd})", d.settings.name);
    println!("  state: {}", d.dir.path.display());
    if let Some(fp) = fingerprint {
        println!("  host key: {fp} (pinned from the console)");
    }
    output::note(format!("took {}", humantime::format_duration(Duration::from_secs(total as u64))));
    Ok(())
}
