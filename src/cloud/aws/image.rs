//! `sgbox image build --cloud aws`: the flow of Packer's amazon-ebs builder, without SSH. A
//! temporary builder (a security group with no inbound rule, an instance from Debian 13 with the
//! bake user-data, IMDSv2 required) bakes the release and powers itself off; its console says
//! whether the bake succeeded. Then: CreateImage (tagged), its snapshots tagged, IMDSv2 required
//! on the image (`ImdsSupport v2.0`), a deprecation time; copies to other regions in parallel,
//! each finished the same way; launch permission for everyone only with `--public`, after a guard
//! (the account may share AMIs publicly in that region; the snapshots are unencrypted).
//!
//! Idempotent and resumable: every resource is found by tag (the builder's by `sgbox:image-build`,
//! images by name, which EC2 keeps unique per region and which carries the recipe) before it is
//! created, and a finished image says so (`sgbox:complete`), so a re-run for the same recipe
//! does nothing. The temporary resources are removed on success, on failure, on Ctrl-C or SIGTERM,
//! and by the next run after a `kill -9` (the janitor, by tag); an image left unfinished by a
//! failure is deregistered with its snapshots.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aws_sdk_ec2::client::Waiters;
use aws_sdk_ec2::primitives::{DateTime, DateTimeFormat};
use aws_sdk_ec2::types::{
    AttributeValue, Filter, Image, ImageState, InstanceStateName, LaunchPermission, LaunchPermissionModifications, PermissionGroup, ResourceType,
    ShutdownBehavior, Tag, TagSpecification,
};
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{api, blank_data_disk, code_of, debian_ami, eventually, imds_v2_only, root_disk, waited};
use crate::cloud::image_spec::{bake_outcome, ImageSpec, TAG_BUILD, TAG_COMPLETE};
use crate::cloud::{failed, io_err, CloudError, Result};
use crate::error::UserError;
use crate::state::write_atomic;

/// The builder's ClientToken across a resume, and its ids as soon as they exist. Tags and names
/// are the truth (every resource is found by them); images are not recorded here, since each
/// region's is found by its name.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BuildJournal {
    pub recipe: String,
    #[serde(default)]
    pub builder_token: Option<String>,
    #[serde(default)]
    pub builder: Option<String>,
    #[serde(default)]
    pub security_group: Option<String>,
}

/// One image of the manifest.
#[derive(Clone, Debug, Serialize)]
pub struct BuiltImage {
    pub region: String,
    pub image_id: String,
    pub name: String,
    pub snapshot_ids: Vec<String>,
    pub public: bool,
    /// Found finished from an earlier run: nothing was done for it now.
    pub reused: bool,
}

pub struct AwsImages {
    conf: aws_config::SdkConfig,
    home: String,
    journal: PathBuf,
}

fn tag_spec(kind: ResourceType, tags: &[(String, String)]) -> TagSpecification {
    let mut b = TagSpecification::builder().resource_type(kind);
    for (k, v) in tags {
        b = b.tags(Tag::builder().key(k).value(v).build());
    }
    b.build()
}

fn tags(t: &[(String, String)]) -> Vec<Tag> {
    t.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()
}

fn has_tag(img: &Image, key: &str) -> bool {
    img.tags().iter().any(|t| t.key() == Some(key))
}

fn snapshots_of(img: &Image) -> Vec<String> {
    img.block_device_mappings().iter().filter_map(|m| m.ebs().and_then(|e| e.snapshot_id())).map(str::to_string).collect()
}

impl AwsImages {
    pub fn new(conf: aws_config::SdkConfig, journal_dir: PathBuf, spec: &ImageSpec) -> AwsImages {
        let home = conf.region().map(|r| r.to_string()).unwrap_or_else(|| spec.region.clone());
        AwsImages { conf, home, journal: journal_dir.join(format!("aws-{}.json", spec.short())) }
    }

    fn ec2(&self, region: &str) -> aws_sdk_ec2::Client {
        let c = aws_sdk_ec2::config::Builder::from(&self.conf).region(aws_config::Region::new(region.to_string())).build();
        aws_sdk_ec2::Client::from_conf(c)
    }

    fn ssm(&self, region: &str) -> aws_sdk_ssm::Client {
        let c = aws_sdk_ssm::config::Builder::from(&self.conf).region(aws_config::Region::new(region.to_string())).build();
        aws_sdk_ssm::Client::from_conf(c)
    }

    fn journal(&self, spec: &ImageSpec) -> BuildJournal {
        std::fs::read_to_string(&self.journal)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| BuildJournal { recipe: spec.recipe.clone(), ..Default::default() })
    }

    fn note_journal(&self, spec: &ImageSpec, f: impl FnOnce(&mut BuildJournal)) -> Result<()> {
        let mut j = self.journal(spec);
        f(&mut j);
        if let Some(d) = self.journal.parent() {
            std::fs::create_dir_all(d).map_err(io_err("creating the image-build journal's folder"))?;
        }
        write_atomic(&self.journal, serde_json::to_string_pretty(&j).expect("json").as_bytes(), 0o644)
            .map_err(|e| failed("writing the image-build journal", format!("{e:#}")))
    }

    /// Everything that can refuse the build before anything exists: every region is one EC2 has
    /// (and the account has opted in to), and with `--public`, that the account may share AMIs
    /// publicly in each of them.
    pub async fn preflight(&self, spec: &ImageSpec) -> Result<()> {
        let out = self.ec2(&self.home).describe_regions().all_regions(true).send().await.map_err(api("DescribeRegions"))?;
        let known: BTreeMap<String, String> = out
            .regions()
            .iter()
            .filter_map(|r| Some((r.region_name()?.to_string(), r.opt_in_status().unwrap_or("opt-in-not-required").to_string())))
            .collect();
        for (i, r) in spec.regions().iter().enumerate() {
            let flag = if i == 0 { "--region" } else { "--copy-to" };
            match known.get(r).map(String::as_str) {
                None => {
                    let near: Vec<&String> = known.keys().filter(|k| strsim::jaro_winkler(k, r) > 0.85).take(3).collect();
                    return Err(UserError::field(flag, format!("{r} is not an AWS region this account's EC2 knows"))
                        .hint(if near.is_empty() {
                            "see `aws ec2 describe-regions --all-regions`".to_string()
                        } else {
                            format!("did you mean {}?", near.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
                        })
                        .into());
                }
                Some("not-opted-in") => {
                    return Err(UserError::field(flag, format!("the account has not opted in to {r}"))
                        .hint(format!("enable it (AWS console, Account, AWS Regions) or leave {r} out"))
                        .into())
                }
                Some(_) => {}
            }
        }
        if spec.public {
            for r in spec.regions() {
                let out = self.ec2(&r).get_image_block_public_access_state().send().await.map_err(api("GetImageBlockPublicAccessState"))?;
                let state = out.image_block_public_access_state().unwrap_or("unknown");
                if state != "unblocked" {
                    return Err(UserError::field(
                        "--public",
                        format!("this account blocks public AMI sharing in {r} (block public access for AMIs: {state}); the image could be built but not published"),
                    )
                    .hint(format!(
                        "build without --public and share it yourself, or turn the block off first: aws ec2 disable-image-block-public-access --region {r}"
                    ))
                    .into());
                }
            }
        }
        Ok(())
    }

    /// Build (or find) the image in every region of the spec; the temporary builder is removed
    /// whatever happens.
    pub async fn build(&self, spec: &ImageSpec, timeout: Duration, note: &(dyn Fn(&str) + Send + Sync)) -> Result<Vec<BuiltImage>> {
        self.janitor(spec, note).await?;
        let stop = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted (Ctrl-C)",
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => "terminated (SIGTERM)",
            }
        };
        let r = tokio::select! {
            r = self.build_all(spec, timeout, note) => r,
            why = stop => Err(CloudError::Failed { op: "image build".into(), message: format!("{why}; cleaned up what was temporary") }),
        };
        let cleaned = self.remove_builder(spec, note).await;
        if r.is_err() {
            for region in spec.regions() {
                if let Ok(Some(img)) = find_image(&self.ec2(&region), spec).await {
                    self.remove_unfinished(&region, img.image_id().unwrap_or_default(), note).await;
                }
            }
        }
        let images = r?;
        cleaned?;
        let _ = std::fs::remove_file(&self.journal);
        Ok(images)
    }

    async fn build_all(&self, spec: &ImageSpec, timeout: Duration, note: &(dyn Fn(&str) + Send + Sync)) -> Result<Vec<BuiltImage>> {
        let until = Instant::now() + timeout;
        let left = || until.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        let home = self.ec2(&spec.region);
        let mut first = match find_image(&home, spec).await? {
            Some(img) if img.state() == Some(&ImageState::Failed) => {
                note(&format!("{} in {} failed earlier; removing it and baking again", img.image_id().unwrap_or(""), spec.region));
                self.remove_unfinished(&spec.region, img.image_id().unwrap_or(""), note).await;
                None
            }
            other => other,
        };
        if first.is_none() {
            let instance = self.bake(spec, left(), note).await?;
            first = Some(self.create_image(&home, spec, &instance, note).await?);
        }
        let first = first.expect("found or created");
        let first_id = first.image_id().unwrap_or_default().to_string();
        let done = finish(&home, &spec.region, &first_id, spec, left(), note).await?;
        self.remove_builder(spec, note).await?;
        let mut out = vec![done];

        // Copies, in parallel; each is found by name first, so a re-run copies nothing twice.
        let mut copies = tokio::task::JoinSet::new();
        for region in spec.regions().into_iter().skip(1) {
            let (ec2, spec2, src, src_region) = (self.ec2(&region), spec.clone(), first_id.clone(), spec.region.clone());
            let wait = left();
            copies.spawn(async move {
                let quiet = |_: &str| {};
                copy_to(&ec2, &region, &src, &src_region, &spec2, wait, &quiet).await
            });
        }
        let mut failures = Vec::new();
        while let Some(r) = copies.join_next().await {
            match r {
                Ok(Ok(img)) => {
                    note(&format!("{} in {}{}", img.image_id, img.region, if img.reused { " (already there)" } else { " (copied)" }));
                    out.push(img);
                }
                Ok(Err(e)) => failures.push(e.to_string()),
                Err(e) => failures.push(format!("a copy's task failed: {e}")),
            }
        }
        if !failures.is_empty() {
            return Err(failed("copying the image", failures.join("; ")));
        }
        out.sort_by_key(|i| spec.regions().iter().position(|r| *r == i.region));
        if spec.public {
            for img in &mut out {
                publish(&self.ec2(&img.region), img).await?;
            }
        }
        Ok(out)
    }

    /// Launch the builder (or find it) and wait until it has baked and powered off.
    async fn bake(&self, spec: &ImageSpec, timeout: Duration, note: &(dyn Fn(&str) + Send + Sync)) -> Result<String> {
        let ec2 = self.ec2(&spec.region);
        let group = match self.builder_group(&ec2, spec).await? {
            Some(g) => g,
            None => {
                let vpcs = ec2
                    .describe_vpcs()
                    .filters(Filter::builder().name("is-default").values("true").build())
                    .send()
                    .await
                    .map_err(api("DescribeVpcs"))?;
                let vpc = vpcs.vpcs().first().and_then(|v| v.vpc_id()).map(str::to_string).ok_or_else(|| {
                    CloudError::Input(
                        UserError::field("--region", format!("{} has no default VPC for the builder", spec.region))
                            .hint("create one (aws ec2 create-default-vpc) or build in another region and --copy-to this one"),
                    )
                })?;
                let out = ec2
                    .create_security_group()
                    .group_name(format!("sgbox-image-{}-builder", spec.short()))
                    .description(format!("sgbox:image-build:{}:no-inbound", spec.short()))
                    .vpc_id(vpc)
                    .tag_specifications(tag_spec(ResourceType::SecurityGroup, &spec.builder_tags("builder-firewall")))
                    .send()
                    .await
                    .map_err(api("CreateSecurityGroup"))?;
                out.group_id().unwrap_or_default().to_string()
            }
        };
        self.note_journal(spec, |j| j.security_group = Some(group.clone()))?;
        let instance = match builders(&ec2, spec).await?.into_iter().next() {
            Some(i) => i,
            None => {
                let ami = debian_ami(&ec2, &self.ssm(&spec.region), &spec.region).await?;
                let token = match self.journal(spec).builder_token {
                    Some(t) => t,
                    None => {
                        let t = format!("sgbox-bake-{}-{}", spec.short(), crate::state::random_token(16));
                        self.note_journal(spec, |j| j.builder_token = Some(t.clone()))?;
                        t
                    }
                };
                let img = ec2.describe_images().image_ids(&ami).send().await.map_err(api("DescribeImages"))?;
                let root = img.images().first().and_then(|i| i.root_device_name()).unwrap_or("/dev/xvda").to_string();
                let out = ec2
                    .run_instances()
                    .image_id(&ami)
                    .instance_type(spec.builder_type.as_str().into())
                    .min_count(1)
                    .max_count(1)
                    .security_group_ids(&group)
                    .user_data(base64::engine::general_purpose::STANDARD.encode(spec.bake_user_data_gzip()))
                    .instance_initiated_shutdown_behavior(ShutdownBehavior::Stop)
                    .metadata_options(imds_v2_only())
                    .block_device_mappings(root_disk(root, spec.root_gb, spec.encrypted))
                    .block_device_mappings(blank_data_disk(spec.data_gb, spec.encrypted))
                    .tag_specifications(tag_spec(ResourceType::Instance, &spec.builder_tags("builder")))
                    .tag_specifications(tag_spec(ResourceType::Volume, &spec.builder_tags("builder-disk")))
                    .client_token(token)
                    .send()
                    .await
                    .map_err(api("RunInstances"))?;
                out.instances()
                    .first()
                    .and_then(|i| i.instance_id())
                    .map(str::to_string)
                    .ok_or_else(|| failed("RunInstances", "no instance returned"))?
            }
        };
        self.note_journal(spec, |j| j.builder = Some(instance.clone()))?;
        note(&format!("builder {instance} is baking Sourcegraph {} ({} images); it powers itself off when done", spec.release, spec.images.len()));

        let until = Instant::now() + timeout;
        let mut last = String::new();
        // A found builder (a resumed run) may have finished already: looked at soon, then less
        // often, up to one DescribeInstances every 15 s through a bake of minutes.
        let mut pause = Duration::from_secs(2);
        loop {
            let d = ec2.describe_instances().instance_ids(&instance).send().await.map_err(api("DescribeInstances"))?;
            let state = d.reservations().iter().flat_map(|r| r.instances()).next().and_then(|i| i.state()).and_then(|s| s.name()).cloned();
            match state {
                Some(InstanceStateName::Stopped) => {
                    // The console of a stopped instance can lag its last lines by a little.
                    let console_until = Instant::now() + Duration::from_secs(300).min(until.saturating_duration_since(Instant::now()));
                    loop {
                        let text = console(&ec2, &instance).await?;
                        match bake_outcome(&text, &spec.recipe) {
                            Some(Ok(())) => return Ok(instance),
                            Some(Err(why)) => return Err(failed("baking the image", format!("{why}; the builder's console:\n{}", tail(&text, 20)))),
                            None if Instant::now() >= console_until => {
                                return Err(failed(
                                    "baking the image",
                                    format!(
                                        "the builder {instance} powered off without saying the bake succeeded; its console:\n{}",
                                        tail(&text, 20)
                                    ),
                                ))
                            }
                            None => tokio::time::sleep(Duration::from_secs(10)).await,
                        }
                    }
                }
                Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown) => {
                    return Err(failed("baking the image", format!("the builder {instance} was terminated before it finished")))
                }
                s => {
                    let s = s.map(|s| s.as_str().to_string()).unwrap_or_else(|| "unknown".into());
                    if s != last {
                        note(&format!("builder {instance}: {s}"));
                        last = s;
                    }
                }
            }
            if Instant::now() >= until {
                return Err(CloudError::Timeout { what: format!("the bake on {instance}"), waited: timeout });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(15));
        }
    }

    async fn create_image(&self, ec2: &aws_sdk_ec2::Client, spec: &ImageSpec, instance: &str, note: &(dyn Fn(&str) + Send + Sync)) -> Result<Image> {
        let out = ec2
            .create_image()
            .instance_id(instance)
            .name(&spec.name)
            .description(&spec.description)
            .no_reboot(true)
            // Tagged at creation, image and snapshots: the IAM policy lets sgbox change only what
            // carries sgbox:managed (and tag only during its own creations).
            .tag_specifications(tag_spec(ResourceType::Image, &spec.image_tags()))
            .tag_specifications(tag_spec(ResourceType::Snapshot, &spec.image_tags()))
            .send()
            .await;
        let id = match out {
            Ok(o) => o.image_id().unwrap_or_default().to_string(),
            // Made by a run killed before it heard back.
            Err(e) if code_of(&e).as_deref() == Some("InvalidAMIName.Duplicate") => match find_image(ec2, spec).await? {
                Some(i) => i.image_id().unwrap_or_default().to_string(),
                None => return Err(api("CreateImage")(e)),
            },
            Err(e) => return Err(api("CreateImage")(e)),
        };
        note(&format!("image {id} created from the builder in {}", spec.region));
        Ok(Image::builder().image_id(id).name(&spec.name).build())
    }

    async fn builder_group(&self, ec2: &aws_sdk_ec2::Client, spec: &ImageSpec) -> Result<Option<String>> {
        let out = ec2
            .describe_security_groups()
            .set_filters(Some(build_filters(spec, "builder-firewall")))
            .send()
            .await
            .map_err(api("DescribeSecurityGroups"))?;
        Ok(out.security_groups().first().and_then(|g| g.group_id()).map(str::to_string))
    }

    /// What a killed run of this recipe left: its builder and security group go; an unfinished
    /// image is finished by this run (or removed, if it failed).
    async fn janitor(&self, spec: &ImageSpec, note: &(dyn Fn(&str) + Send + Sync)) -> Result<()> {
        let ec2 = self.ec2(&spec.region);
        let left = builders(&ec2, spec).await?;
        let group = self.builder_group(&ec2, spec).await?;
        if left.is_empty() && group.is_none() {
            return Ok(());
        }
        // A builder that has baked successfully is still good for its image.
        for id in &left {
            let text = console(&ec2, id).await.unwrap_or_default();
            let stopped = instance_state(&ec2, id).await? == Some(InstanceStateName::Stopped);
            if stopped && matches!(bake_outcome(&text, &spec.recipe), Some(Ok(()))) && find_image(&ec2, spec).await?.is_none() {
                note(&format!("found the builder {id} of an interrupted run, baked; making the image from it"));
                return Ok(());
            }
        }
        note(&format!("removing what an interrupted build left: {}", left.iter().chain(group.iter()).cloned().collect::<Vec<_>>().join(", ")));
        self.remove_builder(spec, note).await
    }

    /// Terminate the builder and delete its security group (found by tag), waiting for each.
    async fn remove_builder(&self, spec: &ImageSpec, note: &(dyn Fn(&str) + Send + Sync)) -> Result<()> {
        let ec2 = self.ec2(&spec.region);
        let ids = builders(&ec2, spec).await?;
        if !ids.is_empty() {
            ec2.terminate_instances().set_instance_ids(Some(ids.clone())).send().await.map_err(api("TerminateInstances"))?;
            let t = Duration::from_secs(600);
            ec2.wait_until_instance_terminated().set_instance_ids(Some(ids.clone())).wait(t).await.map_err(waited("the builder to terminate", t))?;
            note(&format!("builder {} terminated (its root volume with it)", ids.join(", ")));
        }
        if let Some(g) = self.builder_group(&ec2, spec).await? {
            // A terminated instance's network interface can hold the group for a little while.
            let until = Instant::now() + Duration::from_secs(300);
            loop {
                match ec2.delete_security_group().group_id(&g).send().await {
                    Ok(_) => break,
                    Err(e) if code_of(&e).as_deref() == Some("InvalidGroup.NotFound") => break,
                    Err(e) if code_of(&e).as_deref() == Some("DependencyViolation") && Instant::now() < until => {
                        tokio::time::sleep(Duration::from_secs(10)).await
                    }
                    Err(e) => return Err(api("DeleteSecurityGroup")(e)),
                }
            }
            note(&format!("security group {g} deleted"));
        }
        self.note_journal(spec, |j| {
            j.builder = None;
            j.builder_token = None;
            j.security_group = None;
        })
    }

    /// An image this run made but did not finish: deregistered, its snapshots deleted. A finished
    /// one (`sgbox:complete`) is kept. Best effort: what fails is said.
    async fn remove_unfinished(&self, region: &str, id: &str, note: &(dyn Fn(&str) + Send + Sync)) {
        let ec2 = self.ec2(region);
        let Ok(out) = ec2.describe_images().image_ids(id).send().await else { return };
        let Some(img) = out.images().first() else { return };
        if has_tag(img, TAG_COMPLETE) {
            return;
        }
        let snaps = snapshots_of(img);
        if let Err(e) = ec2.deregister_image().image_id(id).send().await {
            note(&format!("could not deregister the unfinished image {id} in {region}: {}", api("DeregisterImage")(e)));
            return;
        }
        for s in &snaps {
            if let Err(e) = ec2.delete_snapshot().snapshot_id(s).send().await {
                note(&format!("could not delete the snapshot {s} in {region}: {}", api("DeleteSnapshot")(e)));
            }
        }
        note(&format!("removed the unfinished image {id} in {region} and its snapshots {}", snaps.join(", ")));
    }
}

fn build_filters(spec: &ImageSpec, role: &str) -> Vec<Filter> {
    vec![
        Filter::builder().name(format!("tag:{TAG_BUILD}")).values(&spec.recipe).build(),
        Filter::builder().name(format!("tag:{}", super::TAG_ROLE)).values(role).build(),
    ]
}

async fn builders(ec2: &aws_sdk_ec2::Client, spec: &ImageSpec) -> Result<Vec<String>> {
    let mut f = build_filters(spec, "builder");
    f.push(Filter::builder().name("instance-state-name").values("pending").values("running").values("stopping").values("stopped").build());
    let out = ec2.describe_instances().set_filters(Some(f)).send().await.map_err(api("DescribeInstances"))?;
    Ok(out.reservations().iter().flat_map(|r| r.instances()).filter_map(|i| i.instance_id()).map(str::to_string).collect())
}

async fn instance_state(ec2: &aws_sdk_ec2::Client, id: &str) -> Result<Option<InstanceStateName>> {
    let d = ec2.describe_instances().instance_ids(id).send().await.map_err(api("DescribeInstances"))?;
    Ok(d.reservations().iter().flat_map(|r| r.instances()).next().and_then(|i| i.state()).and_then(|s| s.name()).cloned())
}

async fn console(ec2: &aws_sdk_ec2::Client, id: &str) -> Result<String> {
    let out = ec2.get_console_output().instance_id(id).latest(true).send().await.map_err(api("GetConsoleOutput"))?;
    let raw = out.output().unwrap_or_default();
    let bytes = base64::engine::general_purpose::STANDARD.decode(raw.trim()).unwrap_or_default();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n")
}

/// The spec's image in a region, by name: EC2 keeps names unique per region and owner, and the
/// name carries the recipe.
async fn find_image(ec2: &aws_sdk_ec2::Client, spec: &ImageSpec) -> Result<Option<Image>> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("name").values(&spec.name).build())
        .send()
        .await
        .map_err(api("DescribeImages"))?;
    Ok(out.images().iter().find(|i| i.state() != Some(&ImageState::Deregistered)).cloned())
}

/// Wait until the image is available, then finish it in its region: its snapshots tagged, IMDSv2
/// required, the deprecation time; then `sgbox:complete`. Each step is idempotent.
async fn finish(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    id: &str,
    spec: &ImageSpec,
    timeout: Duration,
    note: &(dyn Fn(&str) + Send + Sync),
) -> Result<BuiltImage> {
    // EC2 may not show an image it just created or copied yet (InvalidAMIID.NotFound), which
    // the SDK's waiter takes as a failure: seen first, then waited for.
    eventually(|| async { ec2.describe_images().image_ids(id).send().await.map_err(api("DescribeImages")) }).await?;
    ec2.wait_until_image_available().image_ids(id).wait(timeout).await.map_err(waited("the image to be available", timeout))?;
    let out = ec2.describe_images().image_ids(id).send().await.map_err(api("DescribeImages"))?;
    let img = out.images().first().cloned().ok_or_else(|| failed("DescribeImages", format!("{id} vanished in {region}")))?;
    let snaps = snapshots_of(&img);
    let complete = has_tag(&img, TAG_COMPLETE);
    if !complete {
        // Tagged at creation already (CreateImage/CopyImage TagSpecifications); tagging again
        // is idempotent and allowed on what carries sgbox:managed. Redundant since creation tags
        // the snapshots too: kept for now, see the note.
        let mut resources = vec![id.to_string()];
        resources.extend(snaps.iter().cloned());
        ec2.create_tags().set_resources(Some(resources)).set_tags(Some(tags(&spec.image_tags()))).send().await.map_err(api("CreateTags"))?;
        ec2.modify_image_attribute()
            .image_id(id)
            .imds_support(AttributeValue::builder().value("v2.0").build())
            .send()
            .await
            .map_err(api("ModifyImageAttribute"))?;
        let at = DateTime::from_str(&spec.deprecate_at, DateTimeFormat::DateTime).map_err(|e| failed("the deprecation time", e.to_string()))?;
        ec2.enable_image_deprecation().image_id(id).deprecate_at(at).send().await.map_err(api("EnableImageDeprecation"))?;
        ec2.create_tags().resources(id).tags(Tag::builder().key(TAG_COMPLETE).value("true").build()).send().await.map_err(api("CreateTags"))?;
        note(&format!("image {id} in {region}: snapshots {} tagged, IMDSv2 required, deprecated after {}", snaps.join(", "), spec.deprecate_at));
    }
    let public = img.public().unwrap_or(false);
    Ok(BuiltImage { region: region.to_string(), image_id: id.to_string(), name: spec.name.clone(), snapshot_ids: snaps, public, reused: complete })
}

async fn copy_to(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    source: &str,
    source_region: &str,
    spec: &ImageSpec,
    timeout: Duration,
    note: &(dyn Fn(&str) + Send + Sync),
) -> Result<BuiltImage> {
    let id = match find_image(ec2, spec).await? {
        Some(i) => i.image_id().unwrap_or_default().to_string(),
        None => {
            let out = ec2
                .copy_image()
                .source_image_id(source)
                .source_region(source_region)
                .name(&spec.name)
                .description(&spec.description)
                .encrypted(spec.encrypted)
                // The recipe's tags, not the source's (CopyImageTags would also copy
                // sgbox:complete, before this copy is finished).
                .tag_specifications(tag_spec(ResourceType::Image, &spec.image_tags()))
                .tag_specifications(tag_spec(ResourceType::Snapshot, &spec.image_tags()))
                // The same copy on a retry or a resumed run (EC2 keeps ClientTokens).
                .client_token(format!("sgbox-{}-{region}", spec.short()))
                .send()
                .await
                .map_err(api("CopyImage"))?;
            out.image_id().unwrap_or_default().to_string()
        }
    };
    finish(ec2, region, &id, spec, timeout, note).await
}

/// Share the image with everyone, after checking that it can be: its snapshots are not encrypted
/// (AWS refuses public AMIs with encrypted snapshots), and it is the recipe's finished image.
async fn publish(ec2: &aws_sdk_ec2::Client, img: &mut BuiltImage) -> Result<()> {
    if img.public {
        return Ok(());
    }
    if !img.snapshot_ids.is_empty() {
        let snaps = ec2.describe_snapshots().set_snapshot_ids(Some(img.snapshot_ids.clone())).send().await.map_err(api("DescribeSnapshots"))?;
        if let Some(s) = snaps.snapshots().iter().find(|s| s.encrypted() == Some(true)) {
            return Err(failed(
                "making the image public",
                format!(
                    "{} in {} has the encrypted snapshot {}; AWS cannot share it publicly",
                    img.image_id,
                    img.region,
                    s.snapshot_id().unwrap_or("")
                ),
            ));
        }
    }
    ec2.modify_image_attribute()
        .image_id(&img.image_id)
        .launch_permission(LaunchPermissionModifications::builder().add(LaunchPermission::builder().group(PermissionGroup::All).build()).build())
        .send()
        .await
        .map_err(api("ModifyImageAttribute"))?;
    img.public = true;
    Ok(())
}
