//! The upgrade and rollback engine behind `sgbox upgrade` and `sgbox rollback`: move a running
//! box to another release in place. (The commands parse, confirm and print; this does.)
//!
//! The steps come from the planner through the journal ([`crate::stack::journal`]), which lives on the box
//! (`/var/lib/sgbox/upgrade.json`) and is saved before and after every step, so a re-run after a
//! dropped connection or a crash continues at the first unfinished step. Long steps run on the box
//! as transient systemd units (`templates/upgrade/run-step.sh`): they keep going when the SSH
//! connection drops, and a re-run waits for a step still running instead of starting it twice.
//!
//! Order: preflight (healthy at the recorded release, legal path, disk, Docker/Compose, registry)
//! → snapshot of the data disk (filesystem frozen) → pull while the old release serves → either
//! the standard switch (databases, the new migrator's `up`, the backends, the frontend and Caddy,
//! each one on a user's request path handed over while it serves: templates/upgrade/switch.sh) or
//! the multi-version path (application stopped, the newest
//! migrator's `upgrade --from --to` per hop on the hop's database images) → verify → record. Any
//! failure rolls back: the old files, the snapshot if migrations ran, the old release verified.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{json, Value};

use crate::cloud::Endpoint;
use crate::deployment::Deployment;
use crate::error::UserError;
use crate::onbox::{self, Session, HELPERS, STEPS};
use crate::output::{self, Phase};
use crate::release::catalog::catalog;
use crate::release::planner::{self, Hop, PlanRequest, UpgradeKind, UpgradePlan};
use crate::release::version::Version;
use crate::render::{image_ref, BOX_DIR, DATA_MOUNT, PROJECT};
use crate::settings::Settings;
use crate::stack::journal::{Journal, Status, Step, Undo, PATH_ON_BOX};
use crate::stack::readiness::{self, Deadline};
use crate::state::{now_rfc3339, whoami, HistoryEntry};

const PREFLIGHT: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/upgrade/preflight.py"));
const SWITCH: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/upgrade/switch.sh"));
const RELEASES: &str = "/var/lib/sgbox/releases";
const OVERRIDE: &str = "/opt/sgbox/docker-compose.override.yaml";
/// The built-in databases: they keep running (or start first) while the application is stopped.
const DB_SERVICES: [&str; 3] = ["pgsql", "codeintel-db", "codeinsights-db"];
/// Room Docker needs beyond the images themselves (extraction, logs, container layers).
const HEADROOM_BYTES: u64 = 1 << 30;
/// Unpacked layers take about this many times their compressed download size.
const UNPACK_FACTOR: f64 = 2.5;
const MIN_DOCKER: (u32, u32) = (20, 10);
/// `up --wait` and `run -T` as used here.
const MIN_COMPOSE: (u32, u32) = (2, 20);

/// An upgrade's view of the box: the deployment, its SSH session, its endpoint, and how long each
/// step and wait may take.
pub struct Upgrade {
    pub d: Deployment,
    pub on: Session,
    pub ep: Endpoint,
    pub timeout: Duration,
    /// How long one step may run on the box (its unit's RuntimeMaxSec), apart from the waits: a
    /// long migration is not the same thing as a box that does not answer.
    pub step_limit: Duration,
    /// `--insecure-accept-host-key`, for reconnecting after a restore.
    pub insecure: bool,
}

fn compose(file: &str) -> String {
    format!("docker compose -p {PROJECT} --project-directory {BOX_DIR} --env-file {BOX_DIR}/.env -f {file} -f {OVERRIDE}")
}

impl Upgrade {
    /// Take the box's lease for `command` (see [`crate::stack::lease`]).
    pub async fn lease(&self, command: &str, break_lock: bool) -> Result<crate::stack::lease::Lease> {
        let target = crate::onbox::ssh::Target { host: self.ep.host.clone(), port: self.ep.ssh_port, key: self.d.dir.ssh_private_key_path() };
        let pinned = self.d.record.as_ref().and_then(|r| r.host_key.clone()).unwrap_or_else(|| self.on.host_key().to_string());
        crate::stack::lease::acquire(&self.on, target, pinned, &self.d.settings.name, command, break_lock).await
    }

    pub async fn read_journal(&self) -> Result<Option<Journal>> {
        let text = self.on.run(&format!("sudo cat {PATH_ON_BOX} 2>/dev/null || true")).await?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text).map(Some).with_context(|| format!("reading {PATH_ON_BOX} on the box"))
    }

    pub async fn save_journal(&self, j: &Journal) -> Result<()> {
        self.on.put(PATH_ON_BOX, &(serde_json::to_string_pretty(j)? + "\n"), 0o644).await
    }

    /// Run `script` as the step `name` through the runner; Ok(()) or the end of its log.
    async fn step(&self, name: &str, script: &str) -> Result<()> {
        self.on.step(name, script, self.step_limit).await
    }

    /// The files of `release` for this deployment, staged on the box under RELEASES/<release>.
    async fn stage(&self, release: Version) -> Result<()> {
        let s = Settings { version: release, ..self.d.settings.clone() };
        let bundle = crate::deployment::bundle(&self.d.dir, &s)?;
        // One round trip for all of them: under emulation every SSH command costs seconds.
        let dir = format!("{RELEASES}/{release}");
        let mut cmd = format!("sudo install -d -m 0755 {dir}");
        for f in bundle.files.iter() {
            if let Some(name) = staged_name(&f.path) {
                cmd.push_str(&format!(" && {}", onbox::put_cmd(&format!("{dir}/{name}"), &f.content, f.mode)));
            }
        }
        self.on.run(&cmd).await.map(|_| ())
    }

    /// Shell lines that put a staged release's files in place.
    fn install_lines(release: Version) -> String {
        let src = format!("{RELEASES}/{release}");
        format!(
            "for f in docker-compose.yaml Caddyfile; do cp {src}/$f {BOX_DIR}/$f.sgbox-tmp && mv {BOX_DIR}/$f.sgbox-tmp {BOX_DIR}/$f; done\n\
             cp {src}/sourcegraph.service /etc/systemd/system/sourcegraph.service.sgbox-tmp && mv /etc/systemd/system/sourcegraph.service.sgbox-tmp /etc/systemd/system/sourcegraph.service\n\
             cp {src}/deployment.json /etc/sgbox/deployment.json.sgbox-tmp && mv /etc/sgbox/deployment.json.sgbox-tmp /etc/sgbox/deployment.json\n\
             systemctl daemon-reload\n"
        )
    }

    fn release_services(release: Version) -> Vec<String> {
        catalog().get(release).map(|r| r.services.keys().cloned().collect()).unwrap_or_default()
    }

    fn dbs(release: Version) -> String {
        DB_SERVICES.iter().filter(|s| catalog().get(release).is_some_and(|r| r.has(s))).copied().collect::<Vec<_>>().join(" ")
    }

    /// Every service healthy (the migrator exited 0) and `/__version` = `release`.
    async fn verify(&self, release: Version, what: &str) -> Result<()> {
        let deadline = Deadline(Instant::now() + self.timeout);
        let expected = Self::release_services(release);
        let p = Phase::start(format!("{what}: services"));
        if let Err((msg, failing)) = readiness::services(&self.on, &expected, &deadline, &p).await {
            p.fail();
            eprint!("{}", readiness::diagnostics(&self.on, &failing).await);
            bail!("{msg}: {}", failing.join(", "));
        }
        p.done_with(&format!("{} services healthy", expected.len()));
        let p = Phase::start(format!("{what}: /__version"));
        let cmd = readiness::version_cmd(&self.d.settings.tls, self.d.settings.hostname.as_deref());
        if let Err(e) = readiness::answers(&self.on, &cmd, &release.to_string(), &deadline, &p).await {
            p.fail();
            return Err(e);
        }
        p.done_with(&format!("/__version = {release}"));
        Ok(())
    }

    async fn reconnect(&mut self) -> Result<()> {
        self.ep = crate::deployment::running_endpoint(&self.d).await?;
        self.on = crate::deployment::connect(&mut self.d, &self.ep, self.insecure, Instant::now() + self.timeout).await?;
        Ok(())
    }
}

/// The switch's shell functions (templates/upgrade/switch.sh) with `$C`, the compose command
/// they run, set to `c`.
fn switch_prelude(c: &str) -> String {
    format!("C={}\n{SWITCH}\n", onbox::quote(c))
}

/// The standard switch, after the new files are in place: the new release takes over service by
/// service while the old one serves (see templates/upgrade/switch.sh for how each hand-over keeps
/// requests answered). Databases first (the old frontend's queries pause while they restart), the
/// new migrator, the backends (a copy holding the name of each one on the request path), then
/// the frontend and Caddy beside their old releases. A box whose Caddy still publishes its ports
/// through Docker (made by an sgbox before the hand-over) has them replaced in place once, with
/// Caddy holding requests (`lb_try_duration`) while the frontend restarts.
fn standard_switch(to: Version, c: &str) -> String {
    let release = catalog().get(to);
    let handover = release.map(crate::render::handover_services).unwrap_or_default();
    let dbs = Upgrade::dbs(to);
    let rest: Vec<String> = Upgrade::release_services(to)
        .into_iter()
        .filter(|x| {
            !DB_SERVICES.contains(&x.as_str()) && !handover.contains(x) && !["migrator", "sourcegraph-frontend-0", "caddy"].contains(&x.as_str())
        })
        .collect();
    let mut script = format!("reset_switch\nsay databases\n{c} up -d --wait --no-deps {dbs}\nmigrate\n");
    if !handover.is_empty() {
        script.push_str(&format!("handover {}\n", handover.join(" ")));
    }
    // (Named services only: `up` without names would take every service at once.) Not with
    // `--no-deps`: Compose hashes a service with a `depends_on` differently under it, and the last
    // `up` would recreate it (frontend-internal), and the frontend that depends on it, in place.
    // Their dependencies are current by then; the migrator runs its `up` again.
    if !rest.is_empty() {
        script.push_str(&format!("say other backends\n{c} up -d --wait {}\n", rest.join(" ")));
    }
    script.push_str(&format!(
        "if [ \"$(docker inspect -f '{{{{.HostConfig.NetworkMode}}}}' caddy 2>/dev/null)\" = host ] && [ -S \"$SOCKS/caddy.sock\" ]; then\n  switch_frontend\n  switch_caddy\nelse\n  say 'frontend and caddy in place (this box predates the hand-over)'\n  {c} up -d --wait sourcegraph-frontend-0\n  {c} up -d --no-deps caddy\nfi\n"
    ));
    script
}

/// The staged file name of a rendered box file, for the files an upgrade replaces.
fn staged_name(path: &str) -> Option<&'static str> {
    match path {
        p if p == format!("{BOX_DIR}/docker-compose.yaml") => Some("docker-compose.yaml"),
        p if p == format!("{BOX_DIR}/Caddyfile") => Some("Caddyfile"),
        "/etc/systemd/system/sourcegraph.service" => Some("sourcegraph.service"),
        "/etc/sgbox/deployment.json" => Some("deployment.json"),
        _ => None,
    }
}

fn parse_mm(text: &str) -> Option<(u32, u32)> {
    let t = text.trim().trim_start_matches('v');
    let mut it = t.split(['.', '-', '+']).map(|p| p.parse::<u32>());
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

/// What preflight found on the box.
#[derive(Debug, Default)]
pub struct Probe {
    pub avail: u64,
    pub image_bytes: u64,
    pub images_missing: u64,
    pub db_bytes: u64,
    pub errors: Vec<String>,
}

/// Bytes the path needs free on the data disk: unpacked new images, a second copy of the
/// databases when they convert to Postgres 16, and headroom.
pub fn disk_needed(plan: &UpgradePlan, p: &Probe) -> u64 {
    let images = (p.image_bytes as f64 * UNPACK_FACTOR) as u64;
    let pg = if plan.postgres_upgrade { 2 * p.db_bytes } else { 0 };
    images + pg + HEADROOM_BYTES
}

pub fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Every image the path pulls: the target release's, and for each hop its migrator and databases.
fn path_images(settings: &Settings, plan: &UpgradePlan) -> Vec<Value> {
    let insecure = settings.registry_mirror.as_ref().is_some_and(|m| m.insecure);
    let mut refs: Vec<String> = Vec::new();
    let cat = catalog();
    if let Some(r) = cat.get(plan.to) {
        refs.extend(r.services.values().map(|i| image_ref(i, settings)));
    }
    for h in &plan.hops {
        if let Some(m) = cat.get(h.migrator).and_then(|r| r.services.get("migrator")) {
            refs.push(image_ref(m, settings));
        }
        if let Some(r) = cat.get(h.db_images) {
            refs.extend(DB_SERVICES.iter().filter_map(|s| r.services.get(*s)).map(|i| image_ref(i, settings)));
        }
    }
    refs.sort();
    refs.dedup();
    refs.into_iter().map(|r| json!({ "ref": r, "insecure": insecure })).collect()
}

/// Check everything before anything changes. Errors are the user's to fix (exit 2).
pub async fn preflight(s: &Upgrade, plan: &UpgradePlan, from: Version) -> Result<Probe> {
    let p = Phase::start("preflight");
    let r = preflight_checks(s, plan, from, &p).await;
    match &r {
        Ok(_) => {
            p.done_with("healthy, path legal, disk and registry ok");
        }
        Err(_) => {
            p.fail();
        }
    }
    r
}

async fn preflight_checks(s: &Upgrade, plan: &UpgradePlan, from: Version, p: &Phase) -> Result<Probe> {
    let name = &s.d.settings.name;
    // The helpers the steps use: installed (again) by every run, so they match this sgbox.
    s.on.install_runner().await?;
    s.on.put(&format!("{HELPERS}/preflight.py"), PREFLIGHT, 0o755).await?;

    p.set("box release and health");
    let meta = s.on.run("cat /etc/sgbox/deployment.json").await?;
    let on_box = serde_json::from_str::<Value>(&meta).ok().and_then(|v| v["release"].as_str().map(str::to_string)).unwrap_or_default();
    if on_box != from.to_string() {
        return Err(UserError::new(format!("the box says it runs {on_box:?}, but the deployment record says {from}"))
            .hint("check the box with `sgbox status -v`; nothing was changed")
            .into());
    }
    let ps = s.on.run(&readiness::services_cmd()).await?;
    let missing = readiness::not_ready(&Upgrade::release_services(from), &readiness::parse_services(&ps));
    if !missing.is_empty() {
        return Err(UserError::new(format!("the box is not healthy at {from}: {} not ready", missing.join(", ")))
            .hint("an upgrade starts only from a healthy box; see `sgbox status -v` and `sgbox logs SERVICE`. Nothing was changed")
            .into());
    }
    let cmd = readiness::version_cmd(&s.d.settings.tls, s.d.settings.hostname.as_deref());
    match readiness::version_on_box(&s.on, &cmd).await {
        Ok(v) if v == from.to_string() => {}
        other => {
            return Err(UserError::new(format!("/__version does not answer {from} on the box ({other:?})"))
                .hint("check `sgbox status`; nothing was changed")
                .into())
        }
    }

    p.set("docker and compose versions");
    let versions = s.on.run("sudo docker version --format '{{.Server.Version}}'; sudo docker compose version --short").await?;
    let mut lines = versions.lines();
    let (dv, cv) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    if parse_mm(dv).is_none_or(|v| v < MIN_DOCKER) || parse_mm(cv).is_none_or(|v| v < MIN_COMPOSE) {
        return Err(UserError::new(format!(
            "the box has Docker {dv:?} and Compose {cv:?}; upgrades need Docker ≥ {}.{} and Compose ≥ {}.{}",
            MIN_DOCKER.0, MIN_DOCKER.1, MIN_COMPOSE.0, MIN_COMPOSE.1
        ))
        .hint("update them on the box (`sgbox ssh -- sudo apt-get install docker.io docker-compose`); nothing was changed")
        .into());
    }

    p.set("registry and disk space");
    let req = json!({ "images": path_images(&s.d.settings, plan), "volumes": DB_SERVICES.iter().map(|v| format!("{PROJECT}_{v}")).collect::<Vec<_>>(), "mount": DATA_MOUNT });
    let out = s.on.run(&format!("echo {} | base64 -d | sudo python3 {HELPERS}/preflight.py", BASE64.encode(req.to_string()))).await?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("the preflight probe's answer: {out}"))?;
    let probe = Probe {
        avail: v["avail_bytes"].as_u64().unwrap_or(0),
        image_bytes: v["image_bytes"].as_u64().unwrap_or(0),
        images_missing: v["images_missing"].as_u64().unwrap_or(0),
        db_bytes: v["db_bytes"].as_u64().unwrap_or(0),
        errors: v["errors"].as_array().map(|a| a.iter().filter_map(|e| e.as_str().map(str::to_string)).collect()).unwrap_or_default(),
    };
    if !probe.errors.is_empty() {
        return Err(UserError::new(format!(
            "the registry does not serve {} image(s) this upgrade needs:\n  {}",
            probe.errors.len(),
            probe.errors.iter().take(5).cloned().collect::<Vec<_>>().join("\n  ")
        ))
        .hint("check registry-mirror and the box's network; nothing was changed")
        .into());
    }
    let need = disk_needed(plan, &probe);
    if probe.avail < need {
        let pg = if plan.postgres_upgrade {
            format!(", twice the databases' {} for the Postgres 16 conversion", gib(probe.db_bytes))
        } else {
            String::new()
        };
        return Err(UserError::field(
            "disk",
            format!(
                "the data disk of \"{name}\" has {} free; this upgrade needs about {} ({} new images, {} unpacked{pg}, and {} headroom)",
                gib(probe.avail),
                gib(need),
                probe.images_missing,
                gib((probe.image_bytes as f64 * UNPACK_FACTOR) as u64),
                gib(HEADROOM_BYTES)
            ),
        )
        .hint("free space on the box (`sgbox ssh -- sudo docker image prune -a`) or grow the data disk; nothing was changed")
        .into());
    }
    Ok(probe)
}

/// A step as people read it (progress, `--dry-run`).
pub fn describe(step: &Step, j: &Journal) -> String {
    let plan = j;
    match step {
        Step::Preflight => "preflight: healthy at the recorded release, legal path, disk, Docker/Compose, registry".into(),
        Step::Snapshot => "snapshot the data disk (filesystem frozen for the moment it takes)".into(),
        Step::Pull => format!("pull the images of {} while {} serves", plan.to, plan.from),
        Step::StopApplication => "stop the application; the databases stay".into(),
        Step::Migrate { from, to, migrator } => format!("migrator {migrator}: upgrade --from=v{from} --to=v{to}"),
        Step::Apply if plan.kind == UpgradeKind::Standard => {
            format!(
                "switch to {}: databases, its migrator `up`, backends (those on the request path handed over to a copy), then the frontend and Caddy beside their old releases",
                plan.to
            )
        }
        Step::Apply => format!("start {} (its migrator `up` first)", plan.to),
        Step::Verify => format!("verify: every service healthy, /__version = {}", plan.to),
        Step::Record => "record the release in /etc/sgbox and the state folder, with a history entry".into(),
    }
}

/// Run the journal's remaining steps; the finished journal, or (after rolling back) the failure.
pub async fn drive(s: &mut Upgrade, mut j: Journal) -> Result<Journal> {
    let hops = journaled_hops(&j)?;
    if j.failed() {
        // An earlier run failed and its rollback did not finish: finish it.
        let why = j.steps.iter().find(|e| e.status == Status::Failed).and_then(|e| e.detail.clone()).unwrap_or_default();
        return Err(roll_back(s, &mut j, "rolled-back", anyhow!("an earlier run of this upgrade failed: {why}")).await);
    }
    while let Some((i, step)) = j.next() {
        let step = step.clone();
        j.mark(i, Status::Started, &now_rfc3339(), None);
        s.save_journal(&j).await?;
        let label = describe(&step, &j);
        let p = Phase::start(label.clone());
        let result = run_step(s, &mut j, &step, &hops).await;
        match result {
            Ok(detail) => {
                p.done();
                j.mark(i, Status::Done, &now_rfc3339(), detail);
                s.save_journal(&j).await?;
            }
            Err(e) => {
                p.fail();
                j.mark(i, Status::Failed, &now_rfc3339(), Some(format!("{e:#}")));
                s.save_journal(&j).await?;
                let e = e.context(format!("the upgrade {} -> {} failed at: {label}", j.from, j.to));
                if matches!(step, Step::Record) {
                    // The new release runs and is verified; only the bookkeeping failed.
                    return Err(e.context("the new release is verified and serving; re-run `sgbox upgrade` to record it"));
                }
                return Err(roll_back(s, &mut j, "rolled-back", e).await);
            }
        }
    }
    j.outcome = Some("done".into());
    s.save_journal(&j).await?;
    Ok(j)
}

/// The compose override that runs one hop's migrator: serialized, never spliced together (JSON
/// is YAML, and Compose reads it as such).
fn hop_override(upgrade: &str, hop: &Hop, image: &str, args: &[String]) -> String {
    let doc = json!({
        "x-sgbox": format!("hop {} -> {} of the upgrade {upgrade}: the {} migrator on the {} databases", hop.from, hop.to, hop.migrator, hop.db_images),
        "services": { "migrator": { "image": image, "command": args, "restart": "no" } },
    });
    serde_json::to_string_pretty(&doc).expect("a JSON value serializes") + "\n"
}

/// The hops a journal runs: the ones it was planned with. A resume follows them exactly, even when
/// this sgbox's catalog or planner would plan the path differently now. (Journals written before
/// the hops were journaled are planned again, as they were then.)
pub fn journaled_hops(j: &Journal) -> Result<Vec<Hop>> {
    if j.format >= 2 || !j.hops.is_empty() {
        return Ok(j.hops.clone());
    }
    Ok(planner::plan(catalog(), PlanRequest { from: j.from, to: j.to, postgres_major: None, allow_downgrade: true })?.hops)
}

async fn run_step(s: &mut Upgrade, j: &mut Journal, step: &Step, hops: &[Hop]) -> Result<Option<String>> {
    let to = j.to;
    match step {
        // Preflight is done before the journal is created; a resumed journal never has it pending.
        Step::Preflight => Ok(None),
        Step::Snapshot => {
            // Freeze the data filesystem so the snapshot is consistent; a timer thaws it even if
            // this connection dies while it is frozen.
            s.on.run(&format!("sudo systemd-run --quiet --collect --on-active=90 /sbin/fsfreeze -u {DATA_MOUNT} >/dev/null 2>&1 || true; sudo sync; sudo fsfreeze -f {DATA_MOUNT}")).await?;
            let snap = s.d.machine.snapshot_data_disk(&format!("sgbox-pre-{to}")).await;
            let thaw = s.on.run(&format!("sudo fsfreeze -u {DATA_MOUNT}")).await;
            let snap = snap?;
            thaw?;
            j.snapshot = Some(snap.clone());
            Ok(Some(snap))
        }
        Step::Pull => {
            let mut script = String::new();
            s.stage(to).await?;
            script.push_str(&format!("{} pull --quiet\n", compose(&format!("{RELEASES}/{to}/docker-compose.yaml"))));
            for h in hops {
                s.stage(h.db_images).await?;
                let dbs = Upgrade::dbs(h.db_images);
                script.push_str(&format!("{} pull --quiet {dbs}\n", compose(&format!("{RELEASES}/{}/docker-compose.yaml", h.db_images))));
                if let Some(m) = catalog().get(h.migrator).and_then(|r| r.services.get("migrator")) {
                    script.push_str(&format!("docker pull --quiet {} >/dev/null\n", onbox::quote(&image_ref(m, &s.d.settings))));
                }
            }
            s.step("pull", &script).await?;
            Ok(None)
        }
        Step::StopApplication => {
            // Nothing changes data before the snapshot can be restored from (EBS copies it in the
            // background; the pulls above overlapped with that).
            if let Some(snap) = j.snapshot.clone() {
                let p = Phase::start("data snapshot completes");
                let r = s.d.machine.wait_snapshot(&snap, s.timeout, &|l: &str| p.set(l.to_string())).await;
                if let Err(e) = r {
                    p.fail();
                    return Err(e.into());
                }
                p.done_with(&snap);
            }
            let apps: Vec<String> = Upgrade::release_services(j.from).into_iter().filter(|x| !DB_SERVICES.contains(&x.as_str())).collect();
            s.stage(j.from).await?;
            s.step("stop-application", &format!("{} stop {}", compose(&format!("{RELEASES}/{}/docker-compose.yaml", j.from)), apps.join(" ")))
                .await?;
            Ok(None)
        }
        Step::Migrate { from, to: hop_to, migrator } => {
            let hop = hops.iter().find(|h| h.from == *from && h.to == *hop_to).ok_or_else(|| anyhow!("hop {from} -> {hop_to} is not in the plan"))?;
            let m = catalog().get(*migrator).and_then(|r| r.services.get("migrator")).ok_or_else(|| anyhow!("no migrator image in {migrator}"))?;
            let args = hop.migrator_args(j.kind == UpgradeKind::Downgrade);
            let name = format!("migrate-{from}-{hop_to}");
            let hop_file = format!("/var/lib/sgbox/upgrade/{name}.yaml");
            let yaml = hop_override(&j.id, hop, &image_ref(m, &s.d.settings), &args);
            s.stage(hop.db_images).await?;
            s.on.put(&hop_file, &yaml, 0o644).await?;
            let c = format!("{} -f {hop_file}", compose(&format!("{RELEASES}/{}/docker-compose.yaml", hop.db_images)));
            let dbs = Upgrade::dbs(hop.db_images);
            s.step(
                &name,
                &format!(
                    "echo '== databases on {db} images'\n{c} up -d --wait --no-deps {dbs}\n\
                     # A migrator left from an interrupted run finishes before another starts.\n\
                     for id in $(docker ps -aq --filter label=com.docker.compose.project={PROJECT} --filter label=com.docker.compose.service=migrator --filter label=com.docker.compose.oneoff=True); do docker wait \"$id\" >/dev/null || true; docker rm -f \"$id\" >/dev/null; done\n\
                     echo '== migrator {migrator}: {a}'\n{c} run --rm -T --no-deps migrator",
                    db = hop.db_images,
                    a = args.join(" "),
                ),
            )
            .await?;
            Ok(None)
        }
        Step::Apply => {
            s.stage(to).await?;
            let c = compose(&format!("{BOX_DIR}/docker-compose.yaml"));
            let mut script = switch_prelude(&c);
            script.push_str(&Upgrade::install_lines(to));
            if j.kind == UpgradeKind::Standard {
                script.push_str(&standard_switch(to, &c));
            }
            script.push_str(&format!("say all services\n{c} up -d --remove-orphans\n"));
            s.step("apply", &script).await?;
            Ok(None)
        }
        Step::Verify => {
            s.verify(to, "verify").await?;
            Ok(None)
        }
        Step::Record => {
            let entry = HistoryEntry { at: now_rfc3339(), action: "upgrade".into(), release: to, from: Some(j.from), by: j.started_by.clone() };
            record(s, entry, to).await?;
            Ok(None)
        }
    }
}

/// The box's release in /etc/sgbox (history line) and in the state folder's record.
pub async fn record(s: &mut Upgrade, entry: HistoryEntry, release: Version) -> Result<()> {
    let line = serde_json::to_string(&entry)?;
    // The data disk's own record too (cloud-init/data-release.sh): a new machine on it checks it.
    let marker = crate::render::DATA_RELEASE_FILE;
    s.on.run(&format!(
        "{} && printf 'release=%s\\nmachine=%s\\n' {release} \"$(cat /etc/machine-id)\" | sudo sh -c 'cat > {marker}.tmp && sync && mv {marker}.tmp {marker}'",
        onbox::append_cmd("/etc/sgbox/history.jsonl", &(line + "\n"))
    ))
    .await?;
    s.d.machine.record_data_release(release).await?;
    let mut settings = s.d.settings.clone();
    settings.version = release;
    let rec = s.d.record.as_mut().ok_or_else(|| anyhow!("the deployment record vanished"))?;
    rec.release = release;
    rec.settings = settings.to_toml();
    rec.history.push(entry);
    s.d.dir.save_record(rec)?;
    s.d.settings = settings;
    Ok(())
}

/// Undo what the journal says happened, verify the previous release, and return the error to
/// report: `cause` with what the rollback did, or the rollback's own failure. The cause is said
/// once, in that error; while the rollback runs, only that it runs.
async fn roll_back(s: &mut Upgrade, j: &mut Journal, outcome: &str, cause: anyhow::Error) -> anyhow::Error {
    match roll_back_inner(s, j, outcome).await {
        Ok(true) => cause.context(format!(
            "rolled back: {} serves again and is verified. Step logs on the box: `sgbox ssh --name {} -- sudo tail -n 100 {STEPS}/*.log`",
            j.from, s.d.settings.name
        )),
        Ok(false) => cause.context(format!("nothing had changed on the box; it still runs {}", j.from)),
        Err(e) => e.context(format!(
            "the rollback to {} did not finish either (the upgrade failed with: {cause:#}); the journal is {PATH_ON_BOX} on the box, the snapshot {}. Re-run `sgbox upgrade --name {}` to retry the rollback",
            j.from,
            j.snapshot.as_deref().unwrap_or("(none)"),
            s.d.settings.name
        )),
    }
}

/// Whether anything had to be undone.
async fn roll_back_inner(s: &mut Upgrade, j: &mut Journal, outcome: &str) -> Result<bool> {
    let undo = j.undo_plan();
    if undo.is_empty() {
        j.outcome = Some(outcome.into());
        s.save_journal(j).await?;
        return Ok(false);
    }
    let failed_at = j.steps.iter().find(|e| e.status == Status::Failed).map(|e| describe(&e.step, j)).unwrap_or_else(|| "an earlier run".into());
    output::warn(format!("the upgrade {} -> {} failed at: {failed_at}", j.from, j.to));
    if j.data_at_risk() {
        output::warn("migrations ran but there is no snapshot to restore; the previous release may not start on this data");
    }
    output::note(format!(
        "rolling back to {}{}",
        j.from,
        if undo.iter().any(|u| matches!(u, Undo::RestoreSnapshot(_))) { " (migrations ran: restoring the data-disk snapshot)" } else { "" }
    ));
    undo_steps(s, &undo).await?;
    j.outcome = Some(outcome.into());
    s.save_journal(j).await?;
    // The recorded release never left `from`: record() only adds the history entry.
    let entry = HistoryEntry { at: now_rfc3339(), action: "rollback".into(), release: j.from, from: Some(j.to), by: whoami() };
    record(s, entry, j.from).await?;
    Ok(true)
}

pub async fn undo_steps(s: &mut Upgrade, undo: &[Undo]) -> Result<()> {
    for u in undo {
        match u {
            Undo::StopStack => {
                let p = Phase::start("rollback: stop the stack");
                s.on.run(&format!(
                    "sudo systemctl stop 'sgbox-step-*' 2>/dev/null; ids=$(sudo docker ps -q --filter label=com.docker.compose.project={PROJECT}); [ -z \"$ids\" ] || sudo docker stop -t 30 $ids >/dev/null"
                ))
                .await?;
                p.done();
            }
            Undo::RestorePrevious(v) => {
                let p = Phase::start(format!("rollback: the {v} files"));
                s.stage(*v).await?;
                s.on.run(&format!("sudo sh -c {}", onbox::quote(&Upgrade::install_lines(*v)))).await?;
                p.done();
            }
            Undo::RestoreSnapshot(snap) => {
                if s.d.machine.can_swap_data_disk() {
                    let p = Phase::start(format!("rollback: swap the data disk back to {snap}"));
                    match swap_data_disk(s, snap).await {
                        Ok(()) => {
                            p.done();
                            continue;
                        }
                        Err(e) => {
                            p.fail();
                            output::warn(format!("swapping the data disk while the box runs failed ({e:#}); restoring it with a restart instead"));
                        }
                    }
                }
                let p = Phase::start(format!("rollback: restore the data disk to {snap} (the box restarts)"));
                s.d.machine.restore_data_disk(snap, s.timeout).await?;
                s.reconnect().await?;
                p.done();
            }
            Undo::VerifyPrevious(v) => {
                let p = Phase::start(format!("rollback: start {v}"));
                let c = compose(&format!("{BOX_DIR}/docker-compose.yaml"));
                s.step("rollback-start", &format!("{}reset_switch\n{}", switch_prelude(&c), start_previous(&c))).await?;
                p.done();
                s.verify(*v, "rollback").await?;
            }
        }
    }
    Ok(())
}

/// The rollback's start of the previous release, its files in place. After a restore of the data
/// disk `sourcegraph.service` is stopped (a swap) or is being started by the boot (a restart):
/// its start is the same `up`, so the unit is started, or waited for, instead of racing it with a
/// second `up` (under emulation an `up` of 26 running services alone costs about 10 s). Otherwise
/// (no restore, the unit active) the stack is brought to the files with `up`.
/// Each branch says which it took (the step's log, and the e2e test's proof that after a restart
/// the boot started the stack, not sgbox).
fn start_previous(c: &str) -> String {
    format!(
        "unit=$(systemctl is-active sourcegraph.service || true)\n\
         job=$(systemctl show -p Job --value sourcegraph.service || true)\n\
         if [ \"$unit\" = active ] && [ -z \"$job\" ]; then\n  \
           say 'sourcegraph.service is active: up brings the stack to the files'\n  \
           {c} up -d --remove-orphans\n\
         elif [ \"$unit\" = activating ] || [ -n \"$job\" ]; then\n  \
           say 'sourcegraph.service is being started (by the boot): waiting for that start'\n  \
           systemctl start sourcegraph.service\n\
         else\n  \
           say \"sourcegraph.service is $unit: starting it\"\n  \
           systemctl start sourcegraph.service\n\
         fi"
    )
}

/// Restore the data disk while the box runs: Docker stopped and the disk unmounted on the box, the
/// cloud swaps the disk to the snapshot, then the disk is mounted and Docker started, which
/// restarts the containers the snapshot had running; the next undo step starts
/// `sourcegraph.service` ([`start_previous`]). Saves a shutdown and a boot, minutes under
/// emulation. Any failure (a disk that is not mounted cannot be unmounted, and without its fstab
/// line cannot be mounted) leaves the caller to restore with a restart: the boot script mounts
/// the disk and writes its fstab line back.
async fn swap_data_disk(s: &mut Upgrade, snap: &str) -> Result<()> {
    s.on.run(&format!("sudo systemctl stop sourcegraph.service docker.socket docker.service containerd.service && sudo umount {DATA_MOUNT}")).await?;
    s.d.machine.swap_data_disk(snap, s.timeout).await?;
    let by_id = crate::render::data_disk_by_id(s.d.settings.cloud);
    s.on.run(&format!(
        "i=0; while [ ! -e {by_id} ] && [ $i -lt 240 ]; do sleep 0.5; i=$((i+1)); done; sudo udevadm settle; sudo mount {DATA_MOUNT} && sudo systemctl start docker.service"
    ))
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(from: &str, to: &str) -> UpgradePlan {
        planner::plan(catalog(), PlanRequest { from: from.parse().unwrap(), to: to.parse().unwrap(), postgres_major: None, allow_downgrade: false })
            .unwrap()
    }

    #[test]
    fn disk_need_counts_unpacked_images_and_the_postgres_copy() {
        let p = Probe { avail: 0, image_bytes: 4 << 30, images_missing: 20, db_bytes: 10 << 30, errors: vec![] };
        let std = plan("7.4.0", "7.5.4453");
        assert_eq!(disk_needed(&std, &p), (10u64 << 30) + HEADROOM_BYTES, "2.5 x 4 GiB of images, no database copy");
        let mvu = plan("5.9.17785", "7.4.0");
        assert!(mvu.postgres_upgrade);
        assert_eq!(disk_needed(&mvu, &p), (10u64 << 30) + (20u64 << 30) + HEADROOM_BYTES, "plus twice the databases");
    }

    #[test]
    fn the_path_pulls_the_target_and_each_hops_migrator_and_databases() {
        let layer = crate::settings::Layer::from_flags([
            ("cloud", Some("local".to_string())),
            ("registry-mirror", Some("http://10.0.2.2:5000".to_string())),
            ("mirror-mode", Some("tags-only".to_string())),
        ]);
        let s = Settings::resolve(&layer).unwrap();
        let imgs = path_images(&s, &plan("5.9.17785", "7.4.0"));
        let refs: Vec<&str> = imgs.iter().map(|v| v["ref"].as_str().unwrap()).collect();
        assert!(imgs.iter().all(|v| v["insecure"] == true));
        assert!(refs.contains(&"10.0.2.2:5000/migrator:7.5.4453"), "the newest migrator runs the last hop: {refs:?}");
        assert!(refs.contains(&"10.0.2.2:5000/postgresql-16:5.11.6271"), "the waypoint's databases convert to Postgres 16: {refs:?}");
        assert!(refs.contains(&"10.0.2.2:5000/frontend:7.4.0"));
        assert!(!refs.iter().any(|r| r.contains("5.9.17785")), "nothing of the running release is pulled again");
    }

    #[test]
    fn a_resume_follows_the_journaled_hops_not_a_new_plan() {
        let p = plan("5.9.17785", "7.4.0");
        let mut j = Journal::new("5.9-7.4", &p);
        // As if an older sgbox had planned another waypoint than this one's planner would: the
        // journal read back from the box decides.
        j.hops[0].to = "5.10.3033".parse().unwrap();
        j.hops[0].why = "planned by an older sgbox".into();
        let back: Journal = serde_json::from_str(&serde_json::to_string(&j).unwrap()).unwrap();
        assert_eq!(journaled_hops(&back).unwrap(), j.hops);
        assert_ne!(journaled_hops(&back).unwrap(), p.hops);
        // A journal from before hops were journaled (format 1) is planned as it was then.
        let mut old = serde_json::to_value(&j).unwrap();
        old["format"] = 1.into();
        old.as_object_mut().unwrap().remove("hops");
        let old: Journal = serde_json::from_value(old).unwrap();
        assert_eq!(journaled_hops(&old).unwrap(), p.hops);
    }

    #[test]
    fn the_standard_switch_hands_over_the_request_path_in_order_and_is_shell() {
        let to: Version = "7.5.4453".parse().unwrap();
        let c = compose("/opt/sgbox/docker-compose.yaml");
        let switch = standard_switch(to, &c);
        let script = format!("{}{}", switch_prelude(&c), switch);
        let out = std::process::Command::new("sh").args(["-n", "-c", &script]).output().unwrap();
        assert!(out.status.success(), "sh -n: {}", String::from_utf8_lossy(&out.stderr));
        let at = |needle: &str| switch.find(needle).unwrap_or_else(|| panic!("{needle} in {switch}"));
        let handover = switch.lines().find(|l| l.starts_with("handover ")).expect("a hand-over");
        for h in ["searcher-0", "zoekt-webserver-0", "syntect-server"] {
            assert!(handover.split(' ').any(|w| w == h), "{h} handed over: {handover}");
        }
        assert!(at(handover) > at("migrate\n") && at(handover) < at("  switch_frontend\n"), "after the migrator, before the frontend");
        assert!(at("  switch_frontend\n") < at("  switch_caddy\n"));
        assert!(at("reset_switch") < at("say databases"), "a resumed apply starts from no switch");
        let others = &switch[at("say other backends")..at("if [")];
        assert!(others.contains("gitserver-0") && !others.contains("searcher-0") && !others.contains("caddy"), "{others}");
        // No service with a depends_on is brought up with --no-deps (Compose would recreate it at
        // the last `up`), and none is handed over.
        let r = catalog().get(to).unwrap();
        for line in switch.lines().filter(|l| l.contains(" up -d")) {
            if line.contains("--no-deps") {
                let names = line.split("--no-deps").nth(1).unwrap().split_whitespace();
                for n in names {
                    assert!(!crate::render::has_dependencies(r, n), "{n} under --no-deps: {line}");
                }
            }
        }
        assert!(crate::render::handover_services(r).iter().all(|h| !crate::render::has_dependencies(r, h)));
        assert!(others.contains("sourcegraph-frontend-internal"), "{others}");
        // The functions' names the script calls exist in the prelude.
        for f in ["reset_switch()", "migrate()", "handover()", "switch_frontend()", "switch_caddy()"] {
            assert!(SWITCH.contains(f), "{f}");
        }
    }

    /// The switch's functions under a real shell, with `docker` and `curl` played by scripts on PATH
    /// that answer as Docker and Caddy's admin API do.
    #[test]
    fn the_switch_functions_read_docker_and_caddy_as_they_answer() {
        let dir = std::env::temp_dir().join(format!("sgbox-switch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = |name: &str, body: &str| crate::testkit::fake_tool(&dir, name, body);
        // docker: `logs` prints a line (the states come from the API, below).
        fake("docker", r#"case "$1" in logs) echo "last log line" ;; esac"#);
        // curl: on Docker's socket, a container's JSON as the API gives it (compact), by the
        // container's name; otherwise Caddy's upstreams: one request still in flight to :3080 on
        // the first call, none after.
        let health = |h: &str| format!(r#","Health":{{"Status":"{h}","FailingStreak":0,"Log":[{{"ExitCode":0,"Output":"{{\"Status\":\"x\"}}"}}]}}"#);
        let container = |status: &str, health: &str| {
            format!(
                r#"{{"Id":"c0ffee","State":{{"Status":"{status}","Running":true,"Pid":42{health}}},"Config":{{"Healthcheck":{{"Test":["CMD-SHELL","true"]}}}}}}"#
            )
        };
        fake(
            "curl",
            &format!(
                r#"case "$*" in
*/run/docker.sock*healthy-one/json) echo '{healthy}' ;;
*/run/docker.sock*sick/json) echo '{sick}' ;;
*/run/docker.sock*plain/json) echo '{plain}' ;;
*/run/docker.sock*ended/json) echo '{ended}' ;;
*/run/docker.sock*starting/json) echo '{starting}' ;;
*/run/docker.sock*) echo '{{"message":"No such container: x-gone"}}' ;;
*) n=$(cat {d}/calls 2>/dev/null || echo 0); echo $((n+1)) > {d}/calls; if [ "$n" = 0 ]; then echo '[{{"address":"127.0.0.1:3080","num_requests":1,"fails":0}},{{"address":"127.0.0.1:3081","num_requests":7,"fails":0}}]'; else echo '[{{"address":"127.0.0.1:3081","num_requests":7,"fails":0}}]'; fi ;;
esac"#,
                healthy = container("running", &health("healthy")),
                sick = container("running", &health("unhealthy")),
                plain = container("running", ""),
                ended = container("exited", ""),
                starting = container("running", &health("starting")),
                d = dir.display()
            ),
        );
        let sh = |body: &str| {
            let out = crate::testkit::sh_on_path(&dir, &format!("{}{body}", switch_prelude("true")));
            (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string())
        };
        let (rc, out) = sh("say hello world");
        assert_eq!(rc, Some(0));
        assert!(out.starts_with("== ") && out.trim_end().ends_with(" hello world"), "{out}");
        assert_eq!(sh("ready x-healthy-one 1").0, Some(0));
        assert_eq!(sh("ready x-plain 1").0, Some(0), "running without a health check is ready");
        let (rc, out) = sh("ready x-sick 1");
        assert_eq!(rc, Some(1));
        assert!(out.contains("x-sick is unhealthy") && out.contains("last log line"), "{out}");
        let (rc, out) = sh("ready x-ended 1");
        assert_eq!(rc, Some(1));
        assert!(out.contains("x-ended is exited"), "{out}");
        let (rc, out) = sh("ready x-gone 1");
        assert_eq!(rc, Some(1));
        assert!(out.contains("x-gone is missing"), "{out}");
        let (rc, out) = sh("ready x-starting 1");
        assert_eq!(rc, Some(1), "still starting when the seconds are up");
        assert!(out.contains("x-starting is not ready after 1 s (running starting)"), "{out}");
        assert_eq!(sh("within 1 true").0, Some(0));
        let start = std::time::Instant::now();
        assert_eq!(sh("within 1 false").0, Some(1), "gives up");
        assert!(start.elapsed() >= std::time::Duration::from_millis(700), "after about the seconds given (four tries a second)");
        // drained polls until :3080 has no request in flight; :3081's are not its business.
        let (rc, out) = sh("drained caddy.sock 127.0.0.1:3080 5 && echo drained");
        assert_eq!((rc, out.trim()), (Some(0), "drained"));
        assert_eq!(std::fs::read_to_string(dir.join("calls")).unwrap().trim(), "2", "asked again until drained");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The rollback's start under a real shell, `systemctl` played by a script on PATH answering
    /// as systemd does for the unit active, starting at boot (activating, or its job queued), and
    /// stopped: only an active unit with no job gets an `up`; otherwise the unit is started (or its
    /// start joined), never both.
    #[test]
    fn the_rollback_starts_the_unit_unless_it_is_already_up() {
        let dir = std::env::temp_dir().join(format!("sgbox-start-previous-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |active: &str, job: &str| {
            let log = dir.join("log");
            crate::testkit::fake_tool(
                &dir,
                "systemctl",
                &format!("case \"$1\" in\n  is-active) echo {active}; [ {active} = active ] ;;\n  show) echo '{job}' ;;\n  *) echo \"systemctl $*\" >> {} ;;\nesac", log.display()),
            );
            let _ = std::fs::remove_file(&log);
            let c = format!("echo compose >> {}; true", log.display());
            let out =
                crate::testkit::sh_on_path(&dir, &format!("set -eu\nsay() {{ echo \"said: $*\" >> {}; }}\n{}", log.display(), start_previous(&c)));
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            std::fs::read_to_string(&log).unwrap_or_default()
        };
        assert_eq!(
            run("active", ""),
            "said: sourcegraph.service is active: up brings the stack to the files\ncompose\n",
            "running on the files: brought to them with `up`"
        );
        let joined = "said: sourcegraph.service is being started (by the boot): waiting for that start\nsystemctl start sourcegraph.service\n";
        assert_eq!(run("activating", ""), joined, "the boot's start, joined");
        assert_eq!(run("inactive", "17"), joined, "queued at boot, joined");
        assert_eq!(
            run("inactive", ""),
            "said: sourcegraph.service is inactive: starting it\nsystemctl start sourcegraph.service\n",
            "stopped by a swap: started"
        );
        assert_eq!(run("failed", ""), "said: sourcegraph.service is failed: starting it\nsystemctl start sourcegraph.service\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn versions_and_staged_files() {
        assert_eq!(parse_mm("26.1.5+dfsg1"), Some((26, 1)));
        assert_eq!(parse_mm("v2.26.1"), Some((2, 26)));
        assert!(parse_mm("").is_none());
        assert_eq!(staged_name("/opt/sgbox/docker-compose.yaml"), Some("docker-compose.yaml"));
        assert_eq!(staged_name("/opt/sgbox/docker-compose.override.yaml"), None, "the user's override is never replaced");
        assert_eq!(staged_name("/opt/sgbox/.env"), None);
        assert!(Upgrade::install_lines("7.5.4453".parse().unwrap()).contains("/var/lib/sgbox/releases/7.5.4453/sourcegraph.service"));
    }
}
