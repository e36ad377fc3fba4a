//! AWS: the box is an EC2 instance in the default VPC, with a security group (80/443 open, 22
//! only from the configured CIDR), a key pair imported from the deployment's ed25519 key, the
//! Debian 13 AMI (Debian's public SSM parameter, else DescribeImages by Debian's owner id), an
//! encrypted gp3 data volume that survives termination, and an Elastic IP so the URL survives
//! stop/start.
//!
//! Everything is tagged `sgbox:deployment=<name>` and `sgbox:managed=true` and found by those
//! tags (or by the ids recorded in `aws.json`, which EC2 shows sooner) before anything is
//! created, so a re-run after an interruption at any point converges to one of each.
//!
//! What real EC2 does that moto does not, and how it is handled here:
//! - ClientTokens are honoured long after the instance they created is terminated, so each
//!   creation gets its own random token, written to `aws.json` before the call and dropped once
//!   the id is recorded: a retried or resumed call dedupes, an `up` after `down` creates anew.
//! - Describe right after Create may not see the new resource yet (eventual consistency): create
//!   responses are used as they are, and by-id reads retry `*.NotFound` for a while.
//! - A volume attaches only in its own Availability Zone: a kept data volume decides the zone.
//! - `aws.json` keeps the account and region the deployment lives in; commands run with
//!   credentials of another account, or in another region, are refused before they act.
//!
//! Credentials, region and endpoint come from aws-config's standard chain (`AWS_ENDPOINT_URL`
//! included).

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ec2::client::Waiters;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::primitives::Blob;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, DomainType, EbsBlockDevice, Filter, HttpTokensState, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceStateName, IpPermission, IpRange, Ipv6Range, LocationType, Placement, ResourceType, Tag, TagSpecification, VolumeType,
};
use aws_smithy_runtime_api::client::waiters::error::WaiterError;
use base64::Engine;
use serde::{Deserialize, Serialize};

pub mod image;
pub mod lookup;
pub mod policy;

use super::{classify, failed, BaseImage, CloudError, Endpoint, InstanceSpec, InstanceState, KeptDisk, Machine, Resource, Result, Spec};
use crate::cloud::image_spec::TAG_RELEASE;
use crate::error::UserError;
use crate::output;
use crate::release::version::Version;
use crate::state::write_atomic;

/// Debian's AWS account, owner of the official AMIs.
pub const DEBIAN_OWNER: &str = "136693071363";
pub const DEBIAN_SSM_PARAMETER: &str = "/aws/service/debian/release/13/latest/amd64";
pub const TAG_DEPLOYMENT: &str = "sgbox:deployment";
pub const TAG_MANAGED: &str = "sgbox:managed";
pub const TAG_ROLE: &str = "sgbox:role";
const ROOT_GB: i32 = 30;
/// Where the data volume is attached; on Nitro it appears as an NVMe device whatever the name,
/// so the box finds it by size, not by this name.
const DATA_DEVICE: &str = "/dev/sdf";

/// `aws.json`: ids as soon as they exist, and where the deployment lives.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AwsRecord {
    pub region: String,
    /// The AWS account (STS GetCallerIdentity) the deployment was created in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// ClientTokens of creations under way (what → token); dropped once the id is recorded.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tokens: std::collections::BTreeMap<String, String>,
    pub security_group: Option<String>,
    pub key_pair: Option<String>,
    pub image: Option<String>,
    pub instance: Option<String>,
    pub data_volume: Option<String>,
    pub eip_allocation: Option<String>,
}

pub struct Aws {
    spec: Spec,
    dir: PathBuf,
    ec2: aws_sdk_ec2::Client,
    ssm: aws_sdk_ssm::Client,
    sts: aws_sdk_sts::Client,
    region: String,
    /// The credentials' account, once asked.
    account: std::sync::OnceLock<String>,
}

/// Minimum machine for Sourcegraph (its docker-compose requirements).
pub const MIN_VCPUS: i32 = 8;
pub const MIN_MEMORY_GIB: i64 = 32;
/// How long EC2 may take to show a resource it just created (by-id reads retry NotFound).
const CONSISTENCY_WAIT: Duration = Duration::from_secs(90);

/// Retry `f` while EC2 answers NotFound for something just created, for up to CONSISTENCY_WAIT.
async fn eventually<T, F, Fut>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let until = std::time::Instant::now() + CONSISTENCY_WAIT;
    let mut pause = Duration::from_millis(500);
    loop {
        match f().await {
            Err(CloudError::Api { kind: super::ErrorKind::NotFound, .. }) if std::time::Instant::now() + pause < until => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(8));
            }
            other => return other,
        }
    }
}

/// Any AWS SDK call's error (EC2, SSM, STS share the type), classified. An answer without a
/// code the protocol can read (moto's XML to a JSON-protocol client) still has its HTTP status.
fn api<E: ProvideErrorMetadata + std::fmt::Debug>(
    op: &str,
) -> impl FnOnce(aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>) -> CloudError + '_ {
    move |e| {
        let denied = e.raw_response().is_some_and(|r| r.status().as_u16() == 403);
        let code = e.as_service_error().and_then(|s| s.code()).map(str::to_string);
        let code = match (code, e.as_service_error().is_some(), denied) {
            (Some(c), _, _) => c,
            (None, _, true) => "AccessDenied".to_string(),
            (None, true, false) => "error".to_string(),
            (None, false, false) => return failed(op, format!("{e:?}").chars().take(300).collect::<String>()),
        };
        let message = e.as_service_error().and_then(|s| s.message()).unwrap_or("").to_string();
        CloudError::Api { op: op.into(), kind: classify(&code), message, code }
    }
}

/// An SDK waiter's error: its time limit, or the failure it ended in.
fn waited<O, E: std::fmt::Debug>(what: &str, timeout: Duration) -> impl FnOnce(WaiterError<O, E>) -> CloudError + '_ {
    move |e| match e {
        WaiterError::ExceededMaxWait(_) => CloudError::Timeout { what: what.into(), waited: timeout },
        WaiterError::FailureState(_) => failed(format!("waiting for {what}"), "it ended in a state it cannot leave (e.g. terminated)"),
        WaiterError::OperationFailed(e) => failed(format!("waiting for {what}"), format!("{:?}", e.error()).chars().take(300).collect::<String>()),
        _ => failed(format!("waiting for {what}"), "the SDK's waiter could not be started"),
    }
}

fn code_of<E: ProvideErrorMetadata>(e: &aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>) -> Option<String> {
    e.as_service_error().and_then(|s| s.code()).map(str::to_string)
}

/// Instance metadata only through IMDSv2 sessions, one network hop (not from containers behind a
/// bridge): for the box and for an image's builder alike.
fn imds_v2_only() -> InstanceMetadataOptionsRequest {
    InstanceMetadataOptionsRequest::builder()
        .http_tokens(HttpTokensState::Required)
        .http_endpoint(InstanceMetadataEndpointState::Enabled)
        .http_put_response_hop_limit(1)
        .build()
}

/// A gp3 root volume of `gb` GiB at `device`, deleted with its instance.
fn root_disk(device: String, gb: i32, encrypted: bool) -> BlockDeviceMapping {
    BlockDeviceMapping::builder()
        .device_name(device)
        .ebs(EbsBlockDevice::builder().volume_size(gb).volume_type(VolumeType::Gp3).encrypted(encrypted).delete_on_termination(true).build())
        .build()
}

/// A blank gp3 volume of `gb` GiB at the data volume's device, deleted with its instance: the
/// builder's, so that its image carries a data volume for launches without sgbox.
fn blank_data_disk(gb: i32, encrypted: bool) -> BlockDeviceMapping {
    BlockDeviceMapping::builder()
        .device_name(DATA_DEVICE)
        .ebs(EbsBlockDevice::builder().volume_size(gb).volume_type(VolumeType::Gp3).encrypted(encrypted).delete_on_termination(true).build())
        .build()
}

/// Every volume an image maps besides its root (a baked image's blank data volume, or whatever
/// another image carries), left out of a launch: a box has its root and the data volume sgbox
/// made and attaches, nothing else (two blank disks would leave the box to guess which holds
/// its data).
fn without_extra_volumes(image: Option<&aws_sdk_ec2::types::Image>, root: &str) -> Vec<BlockDeviceMapping> {
    image
        .map(|i| i.block_device_mappings())
        .unwrap_or_default()
        .iter()
        .filter_map(|m| m.device_name())
        .filter(|d| *d != root)
        .map(|d| BlockDeviceMapping::builder().device_name(d).no_device("").build())
        .collect()
}

/// The newest of some images, by creation date.
fn newest(images: &[aws_sdk_ec2::types::Image]) -> Option<&aws_sdk_ec2::types::Image> {
    images.iter().max_by(|a, b| a.creation_date().cmp(&b.creation_date()))
}

/// Debian 13's AMI in a region: Debian's public SSM parameter, else Debian's images by owner.
/// Any other refusal (credentials, policy) is reported, not papered over.
pub(crate) async fn debian_ami(ec2: &aws_sdk_ec2::Client, ssm: &aws_sdk_ssm::Client, region: &str) -> Result<String> {
    let via_ssm = match ssm.get_parameter().name(DEBIAN_SSM_PARAMETER).send().await {
        Ok(o) => o.parameter().and_then(|p| p.value()).map(str::to_string),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_parameter_not_found()) => None,
        Err(e) => return Err(api("GetParameter")(e)),
    };
    if let Some(id) = via_ssm {
        return Ok(id);
    }
    let out = ec2
        .describe_images()
        .owners(DEBIAN_OWNER)
        .filters(Filter::builder().name("name").values("debian-13-amd64-*").build())
        .filters(Filter::builder().name("architecture").values("x86_64").build())
        .filters(Filter::builder().name("state").values("available").build())
        .send()
        .await
        .map_err(api("DescribeImages"))?;
    newest(out.images()).and_then(|i| i.image_id()).map(str::to_string).ok_or_else(|| {
        failed("finding the Debian 13 AMI", format!("neither {DEBIAN_SSM_PARAMETER} nor Debian's images (owner {DEBIAN_OWNER}) exist in {region}"))
    })
}

/// The newest finished image of `release` baked by sgbox in this account and region, holding the
/// official image references: (id, name).
async fn baked_image(ec2: &aws_sdk_ec2::Client, release: &str) -> Result<Option<(String, String)>> {
    use crate::cloud::image_spec::{TAG_COMPLETE, TAG_REFS};
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name(format!("tag:{TAG_RELEASE}")).values(release).build())
        .filters(Filter::builder().name(format!("tag:{TAG_REFS}")).values("official").build())
        .filters(Filter::builder().name(format!("tag:{TAG_COMPLETE}")).values("true").build())
        .filters(Filter::builder().name(format!("tag:{TAG_MANAGED}")).values("true").build())
        .filters(Filter::builder().name("state").values("available").build())
        .send()
        .await
        .map_err(api("DescribeImages"))?;
    Ok(newest(out.images()).map(|i| (i.image_id().unwrap_or_default().to_string(), i.name().unwrap_or_default().to_string())))
}

impl Aws {
    /// The SDK configuration sgbox uses: the standard chain (credentials, region, endpoint from
    /// `AWS_ENDPOINT_URL`), its HTTPS client, and patient retries.
    pub fn loader() -> aws_config::ConfigLoader {
        // One HTTPS client for every AWS call (EC2, SSM, STS, and the credential chain's STS/SSO):
        // hyper 1 + rustls on ring. The SDK's default client would build aws-lc from C.
        let https = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(https)
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(8).with_initial_backoff(Duration::from_millis(200)))
    }

    pub async fn new(spec: Spec, deployment_dir: PathBuf) -> Aws {
        let mut loader = Aws::loader();
        if let Some(r) = &spec.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        Aws::with_config(spec, deployment_dir, &loader.load().await)
    }

    pub fn with_config(spec: Spec, deployment_dir: PathBuf, conf: &aws_config::SdkConfig) -> Aws {
        let region = conf.region().map(|r| r.to_string()).unwrap_or_default();
        Aws {
            ec2: aws_sdk_ec2::Client::new(conf),
            ssm: aws_sdk_ssm::Client::new(conf),
            sts: aws_sdk_sts::Client::new(conf),
            account: std::sync::OnceLock::new(),
            spec,
            dir: deployment_dir,
            region,
        }
    }

    fn record(&self) -> AwsRecord {
        std::fs::read_to_string(self.dir.join("aws.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| AwsRecord { region: self.region.clone(), ..Default::default() })
    }

    fn update(&self, f: impl FnOnce(&mut AwsRecord)) -> Result<()> {
        let mut r = self.record();
        f(&mut r);
        std::fs::create_dir_all(&self.dir).map_err(super::io_err("creating the state folder"))?;
        write_atomic(&self.dir.join("aws.json"), serde_json::to_string_pretty(&r).expect("json").as_bytes(), 0o600)
            .map_err(|e| failed("recording AWS ids", format!("{e:#}")))
    }

    fn name(&self, role: &str) -> String {
        self.spec.name_of(role)
    }

    fn tags(&self, resource: ResourceType, role: &str) -> TagSpecification {
        TagSpecification::builder()
            .resource_type(resource)
            .tags(Tag::builder().key(TAG_DEPLOYMENT).value(&self.spec.name).build())
            .tags(Tag::builder().key(TAG_MANAGED).value("true").build())
            .tags(Tag::builder().key(TAG_ROLE).value(role).build())
            .tags(Tag::builder().key("Name").value(self.name(role)).build())
            .build()
    }

    /// The data volume's tags: the deployment's, and the release its databases are at.
    fn data_volume_tags(&self) -> TagSpecification {
        let t = self.tags(ResourceType::Volume, "data");
        let mut tags = t.tags().to_vec();
        tags.push(Tag::builder().key(TAG_RELEASE).value(self.spec.release.to_string()).build());
        TagSpecification::builder().resource_type(ResourceType::Volume).set_tags(Some(tags)).build()
    }

    fn ours(&self) -> Vec<Filter> {
        vec![
            Filter::builder().name(format!("tag:{TAG_DEPLOYMENT}")).values(&self.spec.name).build(),
            Filter::builder().name(format!("tag:{TAG_MANAGED}")).values("true").build(),
        ]
    }

    fn role(&self, role: &str) -> Vec<Filter> {
        let mut f = self.ours();
        f.push(Filter::builder().name(format!("tag:{TAG_ROLE}")).values(role).build());
        f
    }

    /// The ClientToken of the creation `what`: new for each creation, the same for its retries
    /// and resumes (it is recorded before the call and dropped once the created id is).
    fn token(&self, what: &str) -> Result<String> {
        if let Some(t) = self.record().tokens.get(what) {
            return Ok(t.clone());
        }
        use rand::distr::{Alphanumeric, SampleString};
        let t = format!("sgbox-{what}-{}", Alphanumeric.sample_string(&mut rand::rng(), 20));
        self.update(|r| {
            r.tokens.insert(what.to_string(), t.clone());
        })?;
        Ok(t)
    }

    /// The account the credentials belong to.
    async fn account(&self) -> Result<String> {
        if let Some(a) = self.account.get() {
            return Ok(a.clone());
        }
        let out = self.sts.get_caller_identity().send().await.map_err(api("GetCallerIdentity"))?;
        let a = out.account().unwrap_or_default().to_string();
        Ok(self.account.get_or_init(|| a).clone())
    }

    /// Refuse to act when the credentials or region are not the deployment's own: a `down` in
    /// the wrong account would find nothing, and then forget a box that keeps billing.
    async fn same_home(&self) -> Result<Option<String>> {
        let path = self.dir.join("aws.json");
        let Some(rec) = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<AwsRecord>(&t).ok()) else {
            return Ok(None);
        };
        if !rec.region.is_empty() && !self.region.is_empty() && rec.region != self.region {
            return Err(UserError::field(
                "region",
                format!("the deployment \"{}\" lives in {}, not {} (recorded in {})", self.spec.name, rec.region, self.region, path.display()),
            )
            .hint(format!("pass --region {} (or set AWS_REGION={})", rec.region, rec.region))
            .into());
        }
        let account = self.account().await?;
        if let Some(want) = rec.account.filter(|a| !a.is_empty()) {
            if want != account {
                return Err(UserError::field(
                    "credentials",
                    format!(
                        "the deployment \"{}\" lives in AWS account {want}, but these credentials are for account {account} (recorded in {})",
                        self.spec.name,
                        path.display()
                    ),
                )
                .hint(format!("use credentials of account {want} (e.g. the right AWS_PROFILE); nothing was changed"))
                .into());
            }
        }
        Ok(Some(account))
    }

    /// A by-id volume read that waits out EC2's eventual consistency after a create.
    async fn volume_by_id(&self, id: &str) -> Result<aws_sdk_ec2::types::Volume> {
        eventually(|| async {
            let out = self.ec2.describe_volumes().volume_ids(id).send().await.map_err(api("DescribeVolumes"))?;
            out.volumes().first().cloned().ok_or_else(|| CloudError::Api {
                op: "DescribeVolumes".into(),
                kind: super::ErrorKind::NotFound,
                code: "InvalidVolume.NotFound".into(),
                message: format!("{id} not visible yet"),
            })
        })
        .await
    }

    /// Wait until a volume is available, tolerating a NotFound right after its creation.
    async fn volume_available(&self, id: &str, what: &str, timeout: Duration) -> Result<()> {
        self.volume_by_id(id).await?;
        self.ec2.wait_until_volume_available().volume_ids(id).wait(timeout).await.map_err(waited(what, timeout))?;
        Ok(())
    }

    /// vCPUs and memory (GiB) of an instance type, from EC2; None if EC2 does not know it.
    async fn type_shape(&self, t: &str) -> Result<Option<(i32, i64)>> {
        match self.ec2.describe_instance_types().instance_types(t.into()).send().await {
            Ok(o) => Ok(o.instance_types().first().map(|i| {
                (i.v_cpu_info().and_then(|v| v.default_v_cpus()).unwrap_or(0), i.memory_info().and_then(|m| m.size_in_mib()).unwrap_or(0) / 1024)
            })),
            Err(e) if code_of(&e).is_some_and(|c| c.contains("InvalidInstanceType") || c == "InvalidParameterValue") => Ok(None),
            Err(e) if code_of(&e).is_some_and(|c| c.contains("AuthFailure") || c.contains("UnrecognizedClient")) => {
                Err(UserError::new("AWS rejected the credentials")
                    .hint("configure credentials (aws configure, AWS_PROFILE, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
                    .into())
            }
            Err(e) => Err(api("DescribeInstanceTypes")(e)),
        }
    }

    /// Whether the instance type is offered in an Availability Zone.
    async fn offered_in(&self, zone: &str) -> Result<bool> {
        let out = self
            .ec2
            .describe_instance_type_offerings()
            .location_type(LocationType::AvailabilityZone)
            .filters(Filter::builder().name("location").values(zone).build())
            .filters(Filter::builder().name("instance-type").values(&self.spec.machine.instance_type).build())
            .send()
            .await
            .map_err(api("DescribeInstanceTypeOfferings"))?;
        Ok(!out.instance_type_offerings().is_empty())
    }

    fn not_offered(&self, zone: &str, why: &str) -> CloudError {
        UserError::field("instance-type", format!("{} is not offered in {zone}{why}", self.spec.machine.instance_type))
            .hint("pick another --instance-type or --size")
            .into()
    }

    async fn security_group(&self) -> Result<Option<aws_sdk_ec2::types::SecurityGroup>> {
        let out = self.ec2.describe_security_groups().set_filters(Some(self.role("firewall"))).send().await.map_err(api("DescribeSecurityGroups"))?;
        Ok(out.security_groups().first().cloned())
    }

    async fn find_security_group(&self) -> Result<Option<String>> {
        Ok(self.security_group().await?.and_then(|g| g.group_id().map(str::to_string)))
    }

    async fn live_instances(&self) -> Result<Vec<aws_sdk_ec2::types::Instance>> {
        let mut f = self.role("box");
        f.push(Filter::builder().name("instance-state-name").values("pending").values("running").values("stopping").values("stopped").build());
        let out = self.ec2.describe_instances().set_filters(Some(f)).send().await.map_err(api("DescribeInstances"))?;
        Ok(out.reservations().iter().flat_map(|r| r.instances().iter().cloned()).collect())
    }

    async fn data_volume(&self) -> Result<Option<aws_sdk_ec2::types::Volume>> {
        let out = self.ec2.describe_volumes().set_filters(Some(self.role("data"))).send().await.map_err(api("DescribeVolumes"))?;
        Ok(out.volumes().iter().find(|v| v.state().is_some_and(|s| s.as_str() != "deleting" && s.as_str() != "deleted")).cloned())
    }

    /// The deployment's Elastic IP: by tag, else by the recorded allocation id.
    async fn address(&self) -> Result<Option<aws_sdk_ec2::types::Address>> {
        Ok(self.addresses().await?.into_iter().next())
    }

    /// Every Elastic IP of the deployment: the tagged ones and the recorded one (so `down`
    /// releases an address a re-run allocated before its tag was visible).
    async fn addresses(&self) -> Result<Vec<aws_sdk_ec2::types::Address>> {
        let out = self.ec2.describe_addresses().set_filters(Some(self.role("address"))).send().await.map_err(api("DescribeAddresses"))?;
        let mut all: Vec<_> = out.addresses().to_vec();
        if let Some(id) = self.record().eip_allocation {
            if !all.iter().any(|a| a.allocation_id() == Some(id.as_str())) {
                // Just allocated, it may not be visible yet: wait that out before calling it gone.
                let found = eventually(|| async { self.ec2.describe_addresses().allocation_ids(&id).send().await.map_err(api("DescribeAddresses")) });
                match found.await {
                    Ok(o) => all.extend(o.addresses().iter().cloned()),
                    Err(CloudError::Api { kind: super::ErrorKind::NotFound, .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(all)
    }

    /// The recorded instance when tags do not show it yet (and it is not terminated).
    async fn recorded_instance(&self, id: Option<&str>) -> Result<Option<aws_sdk_ec2::types::Instance>> {
        let Some(id) = id else { return Ok(None) };
        let out = match self.ec2.describe_instances().instance_ids(id).send().await {
            Ok(o) => o,
            Err(e) if code_of(&e).is_some_and(|c| c.contains("NotFound")) => return Ok(None),
            Err(e) => return Err(api("DescribeInstances")(e)),
        };
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.state().and_then(|s| s.name()).is_some_and(|n| !matches!(n, InstanceStateName::Terminated | InstanceStateName::ShuttingDown)))
            .cloned())
    }

    /// The zone a new instance must go to: the kept data volume's, checked against the zone and
    /// subnet asked for, and against where the instance type is offered.
    async fn zone_for(&self, kept: Option<&aws_sdk_ec2::types::Volume>, kept_zone: Option<&str>) -> Result<Option<String>> {
        let Some(vz) = kept_zone else { return Ok(self.spec.zone.clone()) };
        let vid = kept.and_then(|v| v.volume_id()).unwrap_or_default();
        if let Some(z) = self.spec.zone.as_deref().filter(|z| *z != vz) {
            return Err(UserError::field(
                "zone",
                format!("the kept data volume {vid} is in {vz}, not {z}; EBS volumes attach only in their own zone"),
            )
            .hint(format!("drop --zone (or pass --zone {vz}); to start afresh elsewhere, `sgbox down --delete-data` first"))
            .into());
        }
        if let Some(subnet) = &self.spec.aws.subnet_id {
            let out = self.ec2.describe_subnets().subnet_ids(subnet).send().await.map_err(api("DescribeSubnets"))?;
            let sz = out.subnets().first().and_then(|s| s.availability_zone()).unwrap_or_default().to_string();
            if sz != vz {
                return Err(UserError::field("subnet-id", format!("{subnet} is in {sz}, but the kept data volume {vid} is in {vz}"))
                    .hint(format!("pass a --subnet-id in {vz}, or drop it to use the default VPC's"))
                    .into());
            }
        }
        if !self.offered_in(vz).await? {
            return Err(self.not_offered(vz, &format!(", where the kept data volume {vid} is")));
        }
        Ok(Some(vz.to_string()))
    }

    async fn run_instance(&self, image: &BaseImage, spec: &InstanceSpec<'_>, zone: Option<String>) -> Result<aws_sdk_ec2::types::Instance> {
        let rec = self.record();
        let img = self.ec2.describe_images().image_ids(&image.id).send().await.map_err(api("DescribeImages"))?;
        let root = img.images().first().and_then(|i| i.root_device_name()).unwrap_or("/dev/xvda").to_string();
        // A baked image's root snapshot may be larger than the default root disk.
        let snapshot_gb = img
            .images()
            .first()
            .and_then(|i| i.block_device_mappings().iter().find(|m| m.device_name() == Some(root.as_str())))
            .and_then(|m| m.ebs())
            .and_then(|e| e.volume_size())
            .unwrap_or(0);
        let mut disks = vec![root_disk(root.clone(), ROOT_GB.max(snapshot_gb), true)];
        disks.extend(without_extra_volumes(img.images().first(), &root));
        let sg = rec.security_group.clone().ok_or_else(|| failed("creating the instance", "no security group recorded"))?;
        let key = rec.key_pair.clone().ok_or_else(|| failed("creating the instance", "no key pair recorded"))?;
        let token = self.token("instance")?;
        let out = self
            .ec2
            .run_instances()
            .image_id(&image.id)
            .instance_type(self.spec.machine.instance_type.clone().as_str().into())
            .min_count(1)
            .max_count(1)
            .key_name(key)
            .security_group_ids(sg)
            .set_subnet_id(self.spec.aws.subnet_id.clone())
            .set_placement(zone.map(|z| Placement::builder().availability_zone(z).build()))
            .user_data(base64::engine::general_purpose::STANDARD.encode(spec.user_data))
            .metadata_options(imds_v2_only())
            .set_block_device_mappings(Some(disks))
            .tag_specifications(self.tags(ResourceType::Instance, "box"))
            .tag_specifications(self.tags(ResourceType::Volume, "root"))
            .client_token(token)
            .send()
            .await
            .map_err(api("RunInstances"))?;
        out.instances().first().cloned().ok_or_else(|| failed("RunInstances", "no instance returned"))
    }

    async fn ssh_cidr(&self) -> Result<String> {
        match &self.spec.ssh_cidr {
            Some(c) => Ok(c.to_string()),
            None => Err(UserError::field("ssh-cidr", "AWS needs to know who may reach SSH")
                .hint("pass --ssh-cidr with your address, e.g. --ssh-cidr 203.0.113.7/32")
                .into()),
        }
    }
}

#[async_trait]
impl Machine for Aws {
    async fn preflight(&self) -> Result<()> {
        if self.region.is_empty() {
            return Err(UserError::field("region", "no AWS region given").hint("pass --region (e.g. us-east-1) or set AWS_REGION").into());
        }
        self.ssh_cidr().await?;
        if let Some(id) = &self.spec.aws.image_id {
            self.given_image(id).await?;
        }
        if let Some(subnet) = &self.spec.aws.subnet_id {
            self.subnet_vpc(subnet).await?;
        }
        // Credentials and region, and that the instance type exists there and is big enough.
        let t = self.spec.machine.instance_type.clone();
        let Some((vcpus, gib)) = self.type_shape(&t).await? else {
            return Err(UserError::field("instance-type", format!("{t} is not offered in {}", self.region))
                .hint("pick another --instance-type or --size")
                .into());
        };
        if (vcpus < MIN_VCPUS || gib < MIN_MEMORY_GIB) && !self.spec.allow_undersized {
            return Err(UserError::field(
                "instance-type",
                format!("{t} has {vcpus} vCPU and {gib} GiB; Sourcegraph needs at least {MIN_VCPUS} vCPU and {MIN_MEMORY_GIB} GiB"),
            )
            .hint("pick a bigger --instance-type or a --size, or pass --allow-undersized to accept a slow, memory-starved box")
            .into());
        }
        if let Some(z) = &self.spec.zone {
            if !self.offered_in(z).await? {
                return Err(self.not_offered(z, ""));
            }
        }
        // A kept data volume (an `up` after `down`) fixes the zone: refuse a conflicting one now.
        if self.live_instances().await?.is_empty() {
            if let Some(v) = self.data_volume().await? {
                self.zone_for(Some(&v), v.availability_zone()).await?;
            }
        }
        // The credentials' account and the region are the deployment's own (when it has any).
        let account = self.same_home().await?;
        let account = match account {
            Some(a) => a,
            None => self.account().await?,
        };
        output::detail(format!("AWS account {account}, region {}", self.region));
        Ok(())
    }

    async fn check_home(&self) -> Result<()> {
        self.same_home().await.map(|_| ())
    }

    async fn kept_data_disk(&self) -> Result<Option<KeptDisk>> {
        if !self.live_instances().await?.is_empty() {
            return Ok(None);
        }
        Ok(self.data_volume().await?.map(|v| KeptDisk {
            id: v.volume_id().unwrap_or_default().to_string(),
            release: v.tags().iter().find(|t| t.key() == Some(TAG_RELEASE)).and_then(|t| t.value()).and_then(|r| r.parse().ok()),
        }))
    }

    async fn record_data_release(&self, release: Version) -> Result<()> {
        let id = match self.data_volume().await? {
            Some(v) => v.volume_id().unwrap_or_default().to_string(),
            None => match self.record().data_volume {
                Some(id) => id,
                None => return Ok(()),
            },
        };
        self.ec2
            .create_tags()
            .resources(&id)
            .tags(Tag::builder().key(TAG_RELEASE).value(release.to_string()).build())
            .send()
            .await
            .map_err(api("CreateTags"))?;
        Ok(())
    }

    async fn ensure_network(&self) -> Result<()> {
        let ssh = self.ssh_cidr().await?;
        let web = self.spec.web_cidr.map(|c| c.to_string()).unwrap_or_else(|| ssh.clone());
        // Where the deployment lives, before the first thing is created there.
        let account = self.account().await?;
        self.update(|r| {
            r.region = self.region.clone();
            r.account.get_or_insert(account);
        })?;
        let existing = self.security_group().await?;
        let have: Vec<(i32, String)> = existing
            .iter()
            .flat_map(|g| g.ip_permissions())
            .flat_map(|p| {
                let port = p.from_port().unwrap_or(-1);
                let v4 = p.ip_ranges().iter().map(move |r| (port, r.cidr_ip().unwrap_or_default().to_string()));
                let v6 = p.ipv6_ranges().iter().map(move |r| (port, r.cidr_ipv6().unwrap_or_default().to_string()));
                v4.chain(v6)
            })
            .collect();
        let id = match existing.and_then(|g| g.group_id().map(str::to_string)) {
            Some(id) => id,
            None => {
                let vpc = match &self.spec.aws.subnet_id {
                    Some(subnet) => Some(self.subnet_vpc(subnet).await?),
                    None => {
                        let vpcs = self
                            .ec2
                            .describe_vpcs()
                            .filters(Filter::builder().name("is-default").values("true").build())
                            .send()
                            .await
                            .map_err(api("DescribeVpcs"))?;
                        vpcs.vpcs().first().and_then(|v| v.vpc_id()).map(str::to_string)
                    }
                };
                let vpc = vpc.ok_or_else(|| {
                    CloudError::Input(
                        UserError::field("subnet-id", format!("{} has no default VPC", self.region))
                            .hint("pass --subnet-id of a subnet with internet access"),
                    )
                })?;
                let out = self
                    .ec2
                    .create_security_group()
                    .group_name(self.name("firewall"))
                    // Free text without spaces: moto's SigV4 check encodes spaces in form bodies
                    // unlike the Rust SDK, so with IAM on it refuses any call that has one.
                    .description(format!("sgbox:{}:firewall:HTTP/HTTPS-from-web-cidr,SSH-from-ssh-cidr", self.spec.name))
                    .vpc_id(&vpc)
                    .tag_specifications(self.tags(ResourceType::SecurityGroup, "firewall"))
                    .send()
                    .await
                    .map_err(api("CreateSecurityGroup"))?;
                out.group_id().unwrap_or_default().to_string()
            }
        };
        // Recorded at once, found or just created.
        self.update(|r| r.security_group = Some(id.clone()))?;
        let want = firewall_rules(&ssh, &web);
        // Only what differs: a converged re-run makes no mutating call; a changed CIDR loses its
        // old rule, so the firewall is exactly what the settings say.
        for (port, from) in have.iter().filter(|h| !want.iter().any(|(p, c, _)| (*p, c.as_str()) == (h.0, h.1.as_str()))) {
            match self.ec2.revoke_security_group_ingress().group_id(&id).ip_permissions(rule(*port, from, "")).send().await {
                Ok(_) => {}
                Err(e) if code_of(&e).as_deref() == Some("InvalidPermission.NotFound") => {}
                Err(e) => return Err(api("RevokeSecurityGroupIngress")(e)),
            }
        }
        for (port, from, what) in want {
            if have.contains(&(port, from.clone())) {
                continue;
            }
            // A group just created may not be visible to the next call yet.
            let r = eventually(|| async {
                match self.ec2.authorize_security_group_ingress().group_id(&id).ip_permissions(rule(port, &from, what)).send().await {
                    Ok(_) => Ok(()),
                    Err(e) if code_of(&e).as_deref() == Some("InvalidPermission.Duplicate") => Ok(()),
                    Err(e) => Err(api("AuthorizeSecurityGroupIngress")(e)),
                }
            });
            r.await?;
        }
        Ok(())
    }

    async fn ensure_key(&self, public_key: &str) -> Result<()> {
        let name = self.name("key");
        let found = self.ec2.describe_key_pairs().set_filters(Some(self.role("key"))).send().await.map_err(api("DescribeKeyPairs"))?;
        if let Some(k) = found.key_pairs().first() {
            let n = k.key_name().unwrap_or_default().to_string();
            return self.update(|r| r.key_pair = Some(n));
        }
        match self
            .ec2
            .import_key_pair()
            .key_name(&name)
            .public_key_material(Blob::new(public_key.as_bytes()))
            .tag_specifications(self.tags(ResourceType::KeyPair, "key"))
            .send()
            .await
        {
            Ok(_) => {}
            // An untagged key of our name is not ours to take over.
            Err(e) if code_of(&e).as_deref() == Some("InvalidKeyPair.Duplicate") => {
                return Err(UserError::field("name", format!("a key pair named {name} exists but is not tagged as this deployment's"))
                    .hint("pick another --name, or delete that key pair")
                    .into())
            }
            Err(e) => return Err(api("ImportKeyPair")(e)),
        }
        self.update(|r| r.key_pair = Some(name))
    }

    async fn find_base_image(&self) -> Result<BaseImage> {
        if let Some(id) = &self.spec.aws.image_id {
            let name = self.given_image(id).await?;
            self.update(|r| r.image = Some(id.clone()))?;
            return Ok(BaseImage { id: id.clone(), description: format!("{id} ({name}, given by image-id)") });
        }
        // A baked image of the release (`sgbox image build`), the newest, when the box uses the
        // official image references it holds; else plain Debian 13, which pulls at first boot.
        if let Some(release) = self.spec.baked_release.as_deref() {
            if let Some((id, name)) = baked_image(&self.ec2, release).await? {
                self.update(|r| r.image = Some(id.clone()))?;
                return Ok(BaseImage { description: format!("{id} ({name}: Sourcegraph {release} baked in)"), id });
            }
        }
        let id = debian_ami(&self.ec2, &self.ssm, &self.region).await?;
        self.update(|r| r.image = Some(id.clone()))?;
        Ok(BaseImage { description: format!("{id} (Debian 13)"), id })
    }

    async fn create_instance(&self, image: &BaseImage, spec: &InstanceSpec<'_>) -> Result<String> {
        let rec = self.record();
        // A kept data volume (an `up` after `down`) decides the zone: EBS attaches only in its own.
        let kept = self.data_volume().await?;
        let kept_zone = kept.as_ref().and_then(|v| v.availability_zone()).map(str::to_string);
        let instance = match self.live_instances().await?.into_iter().next() {
            Some(i) => i,
            None => match self.recorded_instance(rec.instance.as_deref()).await? {
                Some(i) => i,
                None => {
                    let zone = self.zone_for(kept.as_ref(), kept_zone.as_deref()).await?;
                    self.run_instance(image, spec, zone).await?
                }
            },
        };
        let id = instance.instance_id().unwrap_or_default().to_string();
        self.update(|r| {
            r.instance = Some(id.clone());
            r.tokens.remove("instance");
        })?;
        // A box left stopped (by a restore that failed half-way, or by hand) is started again.
        if matches!(instance.state().and_then(|s| s.name()), Some(InstanceStateName::Stopped | InstanceStateName::Stopping)) {
            output::note(format!("the instance {id} is stopped; starting it"));
            self.start(Duration::from_secs(600)).await?;
        }
        let az = instance.placement().and_then(|p| p.availability_zone()).unwrap_or_default().to_string();

        // The data volume: created once, kept on termination, attached to this instance.
        let vol = match kept {
            Some(v) => v,
            None => {
                let token = self.token("data")?;
                let v = self
                    .ec2
                    .create_volume()
                    .availability_zone(&az)
                    .size(self.spec.data_disk_gb as i32)
                    .volume_type(VolumeType::Gp3)
                    .encrypted(true)
                    .tag_specifications(self.data_volume_tags())
                    .client_token(token)
                    .send()
                    .await
                    .map_err(api("CreateVolume"))?;
                // The create's answer, not a Describe that may not see the volume yet.
                aws_sdk_ec2::types::Volume::builder()
                    .set_volume_id(v.volume_id().map(str::to_string))
                    .set_availability_zone(v.availability_zone().map(str::to_string))
                    .build()
            }
        };
        let vid = vol.volume_id().unwrap_or_default().to_string();
        self.update(|r| {
            r.data_volume = Some(vid.clone());
            r.tokens.remove("data");
        })?;
        if vol.availability_zone().is_some_and(|z| z != az) {
            // Real EC2 refuses this attach; say why instead.
            return Err(failed(
                "attaching the data volume",
                format!(
                    "{vid} is in {}, the instance {id} in {az}; delete the instance (`sgbox down`) and run `up` again",
                    vol.availability_zone().unwrap_or("")
                ),
            ));
        }
        let attached_here = vol.attachments().iter().any(|a| a.instance_id() == Some(id.as_str()));
        if !attached_here {
            self.volume_available(&vid, "the data volume to be available", Duration::from_secs(300)).await?;
            self.running(&id, Duration::from_secs(600)).await?;
            self.ec2.attach_volume().volume_id(&vid).instance_id(&id).device(DATA_DEVICE).send().await.map_err(api("AttachVolume"))?;
        }

        // The Elastic IP: the URL survives stop/start. Found by tag, else by the recorded id (a
        // quick re-run may not see the tag yet); AllocateAddress has no ClientToken.
        let addr = match self.address().await? {
            Some(a) => a,
            None => {
                let a = self
                    .ec2
                    .allocate_address()
                    .domain(DomainType::Vpc)
                    .tag_specifications(self.tags(ResourceType::ElasticIp, "address"))
                    .send()
                    .await
                    .map_err(api("AllocateAddress"))?;
                let alloc = a.allocation_id().unwrap_or_default().to_string();
                self.update(|r| r.eip_allocation = Some(alloc.clone()))?;
                aws_sdk_ec2::types::Address::builder().allocation_id(alloc).set_public_ip(a.public_ip().map(str::to_string)).build()
            }
        };
        let alloc = addr.allocation_id().unwrap_or_default().to_string();
        self.update(|r| r.eip_allocation = Some(alloc.clone()))?;
        if addr.instance_id() != Some(id.as_str()) {
            self.running(&id, Duration::from_secs(600)).await?;
            eventually(|| async {
                self.ec2.associate_address().allocation_id(&alloc).instance_id(&id).send().await.map_err(api("AssociateAddress"))
            })
            .await?;
        }
        Ok(id)
    }

    async fn start(&self, timeout: Duration) -> Result<()> {
        let inst = self.live_instances().await?.into_iter().next().ok_or_else(|| failed("starting the box", "it has no instance"))?;
        let id = inst.instance_id().unwrap_or_default().to_string();
        if inst.state().and_then(|s| s.name()) == Some(&InstanceStateName::Stopping) {
            self.ec2.wait_until_instance_stopped().instance_ids(&id).wait(timeout).await.map_err(waited("the instance to stop", timeout))?;
        }
        self.ec2.start_instances().instance_ids(&id).send().await.map_err(api("StartInstances"))?;
        self.running(&id, timeout).await
    }

    async fn wait_running(&self, timeout: Duration) -> Result<Endpoint> {
        let id = self.record().instance.ok_or_else(|| failed("waiting for the instance", "no instance recorded"))?;
        self.running(&id, timeout).await?;
        self.endpoint().await?.ok_or_else(|| failed("reading the address", "the instance has no public address"))
    }

    async fn state(&self) -> Result<InstanceState> {
        let live = self.live_instances().await?;
        Ok(match live.first().and_then(|i| i.state()).and_then(|s| s.name()) {
            None => InstanceState::Absent,
            Some(InstanceStateName::Running) | Some(InstanceStateName::Pending) => InstanceState::Running,
            Some(_) => InstanceState::Stopped,
        })
    }

    async fn endpoint(&self) -> Result<Option<Endpoint>> {
        let ip = match self.address().await? {
            Some(a) if a.instance_id().is_some() => a.public_ip().map(str::to_string),
            _ => self.live_instances().await?.first().and_then(|i| i.public_ip_address()).map(str::to_string),
        };
        Ok(ip.map(|host| Endpoint { host, ssh_port: 22, http_port: 80, https_port: 443 }))
    }

    fn console_hint(&self) -> String {
        let id = self.record().instance.unwrap_or_else(|| "<instance id>".into());
        format!("the box's console: `aws ec2 get-console-output --region {} --instance-id {id} --latest --output text`", self.region)
    }

    async fn console_output(&self) -> Result<String> {
        let Some(id) = self.record().instance else { return Ok(String::new()) };
        let out = self.ec2.get_console_output().instance_id(id).latest(true).send().await.map_err(api("GetConsoleOutput"))?;
        let text = out.output().unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD.decode(text.trim()).unwrap_or_else(|_| text.as_bytes().to_vec());
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn snapshot_data_disk(&self, label: &str) -> Result<String> {
        let vid =
            self.data_volume().await?.and_then(|v| v.volume_id().map(str::to_string)).ok_or_else(|| failed("snapshotting", "no data volume"))?;
        let out = self
            .ec2
            .create_snapshot()
            .volume_id(vid)
            .description(format!("sgbox:{}:{label}", self.spec.name))
            .tag_specifications(self.tags(ResourceType::Snapshot, "snapshot"))
            .send()
            .await
            .map_err(api("CreateSnapshot"))?;
        Ok(out.snapshot_id().unwrap_or_default().to_string())
    }

    async fn wait_snapshot(&self, snapshot: &str, timeout: Duration, note: &(dyn for<'s> Fn(&'s str) + Send + Sync)) -> Result<()> {
        // EBS copies a snapshot in the background (a first one of 250 GB can take an hour); a
        // restore from an unfinished one fails, so nothing that changes data runs before this.
        let started = std::time::Instant::now();
        let mut said = String::new();
        loop {
            let out = eventually(|| async {
                let o = self.ec2.describe_snapshots().snapshot_ids(snapshot).send().await.map_err(api("DescribeSnapshots"))?;
                o.snapshots().first().cloned().ok_or_else(|| failed("DescribeSnapshots", format!("{snapshot} not found")))
            })
            .await?;
            let state = out.state().map(|s| s.as_str().to_string()).unwrap_or_default();
            match state.as_str() {
                "completed" => return Ok(()),
                "error" | "recoverable" | "recovering" => {
                    return Err(failed(
                        "waiting for the data snapshot",
                        format!("{snapshot} is {state}: {}", out.state_message().unwrap_or("EBS gave no reason")),
                    ))
                }
                _ => {}
            }
            let pct: f64 = out.progress().unwrap_or("0%").trim_end_matches('%').parse().unwrap_or(0.0);
            let spent = started.elapsed();
            let line = if pct >= 1.0 && spent.as_secs() >= 10 {
                let left = spent.as_secs_f64() * (100.0 - pct) / pct;
                format!("snapshot {snapshot}: {pct:.0}% (about {} left at this rate)", humantime::format_duration(Duration::from_secs(left as u64)))
            } else {
                format!("snapshot {snapshot}: {pct:.0}% (EBS copies the whole disk the first time)")
            };
            if line != said {
                note(&line);
                said = line;
            }
            if spent >= timeout {
                return Err(CloudError::Timeout { what: format!("the data snapshot {snapshot} to complete"), waited: timeout });
            }
            tokio::time::sleep(Duration::from_secs(if spent.as_secs() < 60 { 3 } else { 15 })).await;
        }
    }

    async fn restore_data_disk(&self, snapshot: &str, timeout: Duration) -> Result<()> {
        // EBS cannot roll a volume back: a new volume is made from the snapshot and swapped in
        // while the instance is stopped. The replaced volume is kept (role data-before-restore).
        // The new volume is made and `available` before anything is stopped, so a failure there
        // leaves the box running as it was.
        let inst = self.live_instances().await?.into_iter().next().ok_or_else(|| failed("restoring the data disk", "no instance"))?;
        let iid = inst.instance_id().unwrap_or_default().to_string();
        let az = inst.placement().and_then(|p| p.availability_zone()).unwrap_or_default().to_string();
        let source = Filter::builder().name("tag:sgbox:restored-from").values(snapshot).build();
        let mut f = self.ours();
        f.push(source);
        let found = self.ec2.describe_volumes().set_filters(Some(f)).send().await.map_err(api("DescribeVolumes"))?;
        let token_key = format!("restore-{snapshot}");
        let restored = match found.volumes().iter().find(|v| v.state().is_some_and(|s| s.as_str() != "deleting" && s.as_str() != "deleted")) {
            Some(v) => v.volume_id().unwrap_or_default().to_string(),
            None => {
                self.wait_snapshot(snapshot, timeout, &|l: &str| output::note(l)).await?;
                let base = self.tags(ResourceType::Volume, "data-restoring");
                let tags = TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(base.tags().iter().cloned().chain([Tag::builder().key("sgbox:restored-from").value(snapshot).build()]).collect()))
                    .build();
                let token = self.token(&token_key)?;
                let v = self
                    .ec2
                    .create_volume()
                    .availability_zone(&az)
                    .snapshot_id(snapshot)
                    .volume_type(VolumeType::Gp3)
                    .encrypted(true)
                    .tag_specifications(tags)
                    .client_token(token)
                    .send()
                    .await
                    .map_err(api("CreateVolume"))?;
                v.volume_id().unwrap_or_default().to_string()
            }
        };
        self.update(|r| {
            r.tokens.remove(&token_key);
        })?;
        let state = self.volume_by_id(&restored).await?;
        if state.state().is_none_or(|s| s.as_str() != "in-use") {
            self.volume_available(&restored, "the restored volume to be available", timeout).await?;
        }
        if inst.state().and_then(|s| s.name()) != Some(&InstanceStateName::Stopped) {
            self.ec2.stop_instances().instance_ids(&iid).send().await.map_err(api("StopInstances"))?;
            self.ec2.wait_until_instance_stopped().instance_ids(&iid).wait(timeout).await.map_err(waited("the instance to stop", timeout))?;
        }
        if let Some(old) = self.data_volume().await?.filter(|v| v.volume_id() != Some(restored.as_str())) {
            let oid = old.volume_id().unwrap_or_default().to_string();
            if let Some(att) = old.attachments().first() {
                // The instance named too: EC2 accepts without, moto does not.
                self.ec2
                    .detach_volume()
                    .volume_id(&oid)
                    .set_instance_id(att.instance_id().map(str::to_string))
                    .send()
                    .await
                    .map_err(api("DetachVolume"))?;
                self.detached(&oid, timeout).await?;
            }
            self.retag_role(&oid, "data-before-restore").await?;
        }
        self.retag_role(&restored, "data").await?;
        self.update(|r| r.data_volume = Some(restored.clone()))?;
        let o = self.volume_by_id(&restored).await?;
        if !o.attachments().iter().any(|a| a.instance_id() == Some(iid.as_str())) {
            self.ec2.attach_volume().volume_id(&restored).instance_id(&iid).device(DATA_DEVICE).send().await.map_err(api("AttachVolume"))?;
        }
        self.ec2.start_instances().instance_ids(&iid).send().await.map_err(api("StartInstances"))?;
        self.running(&iid, timeout).await
    }

    async fn snapshots(&self) -> Result<Vec<super::Snapshot>> {
        self.snapshot_list().await
    }

    async fn delete_snapshot(&self, id: &str) -> Result<()> {
        if !self.snapshot_ids().await?.iter().any(|s| s == id) {
            return Err(UserError::field("snapshot", format!("{id} is not a snapshot of \"{}\"", self.spec.name))
                .hint("list them with `sgbox snapshots`")
                .into());
        }
        self.ec2.delete_snapshot().snapshot_id(id).send().await.map_err(api("DeleteSnapshot"))?;
        Ok(())
    }

    async fn replaced_disks(&self) -> Result<Vec<Resource>> {
        Ok(self
            .volumes_with_role("data-before-restore")
            .await?
            .into_iter()
            .map(|id| Resource { kind: "replaced data volume".into(), id, kept_by_default: true })
            .collect())
    }

    async fn delete_replaced_disk(&self, id: &str) -> Result<()> {
        if !self.volumes_with_role("data-before-restore").await?.iter().any(|v| v == id) {
            return Err(failed("deleting a replaced data volume", format!("{id} is not one of this deployment's")));
        }
        self.detached(id, Duration::from_secs(300)).await?;
        self.ec2.delete_volume().volume_id(id).send().await.map_err(api("DeleteVolume"))?;
        Ok(())
    }

    async fn resources(&self) -> Result<Vec<Resource>> {
        let r = |kind: &str, id: &str, kept: bool| Resource { kind: kind.into(), id: id.into(), kept_by_default: kept };
        let mut out = Vec::new();
        for i in self.live_instances().await? {
            out.push(r("instance", i.instance_id().unwrap_or_default(), false));
        }
        for a in self.addresses().await? {
            out.push(r("elastic ip", a.allocation_id().unwrap_or_default(), false));
        }
        if let Some(v) = self.data_volume().await? {
            out.push(r("data volume", v.volume_id().unwrap_or_default(), true));
        }
        let keys = self.ec2.describe_key_pairs().set_filters(Some(self.role("key"))).send().await.map_err(api("DescribeKeyPairs"))?;
        for k in keys.key_pairs() {
            out.push(r("key pair", k.key_name().unwrap_or_default(), false));
        }
        if let Some(sg) = self.find_security_group().await? {
            out.push(r("security group", &sg, false));
        }
        for v in self.volumes_with_role("data-before-restore").await? {
            out.push(r("replaced data volume", &v, true));
        }
        // A restore that stopped half-way leaves its new volume under this role; `destroy`
        // deletes it with the data, so it is listed with the data.
        for v in self.volumes_with_role("data-restoring").await? {
            out.push(r("restoring data volume", &v, true));
        }
        for sn in self.snapshot_ids().await? {
            out.push(r("data snapshot", &sn, true));
        }
        for (v, role) in self.other_volumes().await? {
            out.push(r(&format!("volume (role {})", if role.is_empty() { "none" } else { &role }), &v, true));
        }
        Ok(out)
    }

    async fn destroy(&self, delete_data: bool, timeout: Duration) -> Result<Vec<Resource>> {
        // Dependency order: address, instance (and wait), data volume, key, security group.
        for a in self.addresses().await? {
            if let Some(assoc) = a.association_id() {
                self.ec2.disassociate_address().association_id(assoc).send().await.map_err(api("DisassociateAddress"))?;
            }
            self.ec2.release_address().allocation_id(a.allocation_id().unwrap_or_default()).send().await.map_err(api("ReleaseAddress"))?;
        }
        let ids: Vec<String> = self.live_instances().await?.iter().filter_map(|i| i.instance_id().map(str::to_string)).collect();
        if !ids.is_empty() {
            self.ec2.terminate_instances().set_instance_ids(Some(ids.clone())).send().await.map_err(api("TerminateInstances"))?;
            self.ec2
                .wait_until_instance_terminated()
                .set_instance_ids(Some(ids))
                .wait(timeout)
                .await
                .map_err(waited("the instance to terminate", timeout))?;
        }
        if delete_data {
            if let Some(v) = self.data_volume().await? {
                let vid = v.volume_id().unwrap_or_default().to_string();
                self.detached(&vid, timeout).await?;
                self.ec2.delete_volume().volume_id(&vid).send().await.map_err(api("DeleteVolume"))?;
            }
            for vid in self.volumes_with_role("data-before-restore").await?.into_iter().chain(self.volumes_with_role("data-restoring").await?) {
                self.detached(&vid, timeout).await?;
                self.ec2.delete_volume().volume_id(&vid).send().await.map_err(api("DeleteVolume"))?;
            }
            for sn in self.snapshot_ids().await? {
                self.ec2.delete_snapshot().snapshot_id(&sn).send().await.map_err(api("DeleteSnapshot"))?;
            }
            for (vid, _) in self.other_volumes().await? {
                self.detached(&vid, timeout).await?;
                self.ec2.delete_volume().volume_id(&vid).send().await.map_err(api("DeleteVolume"))?;
            }
        }
        let keys = self.ec2.describe_key_pairs().set_filters(Some(self.role("key"))).send().await.map_err(api("DescribeKeyPairs"))?;
        for k in keys.key_pairs() {
            // By name: what every EC2 implementation accepts; the name was found by our tags.
            let req = match (k.key_name(), k.key_pair_id()) {
                (Some(n), _) => self.ec2.delete_key_pair().key_name(n),
                (None, Some(id)) => self.ec2.delete_key_pair().key_pair_id(id),
                (None, None) => continue,
            };
            req.send().await.map_err(api("DeleteKeyPair"))?;
        }
        if let Some(sg) = self.find_security_group().await? {
            self.ec2.delete_security_group().group_id(sg).send().await.map_err(api("DeleteSecurityGroup"))?;
        }
        // The ids go; where the deployment lives stays while its state folder does (a kept data
        // volume is still in that account and region).
        let rec = self.record();
        if self.dir.join("aws.json").exists() {
            let kept = AwsRecord { region: rec.region, account: rec.account, ..Default::default() };
            write_atomic(&self.dir.join("aws.json"), serde_json::to_string_pretty(&kept).expect("json").as_bytes(), 0o600)
                .map_err(|e| failed("recording AWS ids", format!("{e:#}")))?;
        }
        let mut left = self.resources().await?;
        left.retain(|r| delete_data || !r.kept_by_default);
        Ok(left)
    }
}

impl Aws {
    /// The name of a user-given AMI, or a user error if it does not exist.
    async fn given_image(&self, id: &str) -> Result<String> {
        let found = match self.ec2.describe_images().image_ids(id).send().await {
            Ok(o) => o.images().first().map(|i| i.name().unwrap_or(id).to_string()),
            Err(e) if code_of(&e).is_some_and(|c| c.starts_with("InvalidAMIID")) => None,
            Err(e) => return Err(api("DescribeImages")(e)),
        };
        found.ok_or_else(|| {
            UserError::field("image-id", format!("{id} does not exist in {}", self.region))
                .hint("check --image-id and --region, or drop it to use Debian 13")
                .into()
        })
    }

    /// The VPC of a user-given subnet, or a user error if it does not exist.
    async fn subnet_vpc(&self, subnet: &str) -> Result<String> {
        let out = self.ec2.describe_subnets().subnet_ids(subnet).send().await;
        let vpc = match out {
            Ok(o) => o.subnets().first().and_then(|s| s.vpc_id()).map(str::to_string),
            Err(e) if code_of(&e).is_some_and(|c| c.starts_with("InvalidSubnetID")) => None,
            Err(e) => return Err(api("DescribeSubnets")(e)),
        };
        vpc.ok_or_else(|| {
            UserError::field("subnet-id", format!("{subnet} does not exist in {}", self.region)).hint("check --subnet-id and --region").into()
        })
    }

    async fn volumes_with_role(&self, role: &str) -> Result<Vec<String>> {
        let out = self.ec2.describe_volumes().set_filters(Some(self.role(role))).send().await.map_err(api("DescribeVolumes"))?;
        Ok(out
            .volumes()
            .iter()
            .filter(|v| v.state().is_some_and(|s| s.as_str() != "deleting" && s.as_str() != "deleted"))
            .filter_map(|v| v.volume_id().map(str::to_string))
            .collect())
    }

    async fn snapshot_ids(&self) -> Result<Vec<String>> {
        Ok(self.snapshot_list().await?.into_iter().map(|s| s.id).collect())
    }

    async fn snapshot_list(&self) -> Result<Vec<super::Snapshot>> {
        let out = self
            .ec2
            .describe_snapshots()
            .owner_ids("self")
            .set_filters(Some(self.role("snapshot")))
            .send()
            .await
            .map_err(api("DescribeSnapshots"))?;
        let mut all: Vec<super::Snapshot> = out
            .snapshots()
            .iter()
            .map(|s| super::Snapshot {
                id: s.snapshot_id().unwrap_or_default().to_string(),
                label: s.description().unwrap_or_default().rsplit(':').next().unwrap_or_default().to_string(),
                created: s.start_time().and_then(|t| t.fmt(aws_sdk_ec2::primitives::DateTimeFormat::DateTime).ok()).unwrap_or_default(),
                size_gib: s.volume_size().map(|g| g as u64),
            })
            .collect();
        all.sort_by(|a, b| a.created.cmp(&b.created));
        Ok(all)
    }

    /// Tagged volumes of the deployment in no role `resources` knows (nothing tagged is hidden).
    async fn other_volumes(&self) -> Result<Vec<(String, String)>> {
        let out = self.ec2.describe_volumes().set_filters(Some(self.ours())).send().await.map_err(api("DescribeVolumes"))?;
        let live: Vec<String> = self.live_instances().await?.iter().filter_map(|i| i.instance_id().map(str::to_string)).collect();
        Ok(out
            .volumes()
            .iter()
            .filter(|v| v.state().is_some_and(|s| s.as_str() != "deleting" && s.as_str() != "deleted"))
            .filter_map(|v| {
                let role = v.tags().iter().find(|t| t.key() == Some(TAG_ROLE)).and_then(|t| t.value()).unwrap_or("").to_string();
                let on_live = v.attachments().iter().any(|a| a.instance_id().is_some_and(|i| live.iter().any(|l| l == i)));
                let known = matches!(role.as_str(), "data" | "data-before-restore" | "data-restoring") || (role == "root" && on_live);
                (!known).then(|| (v.volume_id().unwrap_or_default().to_string(), role))
            })
            .collect())
    }

    async fn retag_role(&self, id: &str, role: &str) -> Result<()> {
        self.ec2
            .create_tags()
            .resources(id)
            .tags(Tag::builder().key(TAG_ROLE).value(role).build())
            .tags(Tag::builder().key("Name").value(self.name(role)).build())
            .send()
            .await
            .map_err(api("CreateTags"))?;
        Ok(())
    }

    /// Wait for the instance to run (the SDK's waiter: it fails at once on a terminal state).
    async fn running(&self, id: &str, timeout: Duration) -> Result<()> {
        self.ec2.wait_until_instance_running().instance_ids(id).wait(timeout).await.map_err(waited("the instance to be running", timeout))?;
        Ok(())
    }

    /// Wait for a volume to be detached (available); one that is gone ends the wait too, and the
    /// next call says why.
    async fn detached(&self, id: &str, timeout: Duration) -> Result<()> {
        match self.ec2.wait_until_volume_available().volume_ids(id).wait(timeout).await {
            Ok(_) => Ok(()),
            Err(WaiterError::OperationFailed(e)) if e.error().code().is_some_and(|c| c.starts_with("InvalidVolume.NotFound")) => Ok(()),
            Err(WaiterError::FailureState(_)) => Ok(()),
            Err(e) => Err(waited("a data volume to detach", timeout)(e)),
        }
    }
}

/// The rules the box's security group holds: (port, CIDR, description).
fn firewall_rules(ssh: &str, web: &str) -> Vec<(i32, String, &'static str)> {
    vec![(80, web.to_string(), "HTTP:sgbox-web-cidr"), (443, web.to_string(), "HTTPS:sgbox-web-cidr"), (22, ssh.to_string(), "SSH:sgbox-ssh-cidr")]
}

/// One TCP ingress rule; IPv6 blocks go in Ipv6Ranges (EC2 rejects them in IpRanges).
fn rule(port: i32, cidr: &str, what: &str) -> IpPermission {
    let b = IpPermission::builder().ip_protocol("tcp").from_port(port).to_port(port);
    let b = if cidr.contains(':') {
        let r = Ipv6Range::builder().cidr_ipv6(cidr);
        b.ipv6_ranges(if what.is_empty() { r } else { r.description(what) }.build())
    } else {
        let r = IpRange::builder().cidr_ip(cidr);
        b.ip_ranges(if what.is_empty() { r } else { r.description(what) }.build())
    };
    b.build()
}

#[cfg(test)]
mod moto_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Layer, Settings};

    #[test]
    fn ipv6_blocks_go_to_ipv6_ranges() {
        let p = rule(22, "2001:db8::/48", "SSH");
        assert!(p.ip_ranges().is_empty());
        assert_eq!(p.ipv6_ranges()[0].cidr_ipv6(), Some("2001:db8::/48"));
        let p = rule(22, "203.0.113.7/32", "SSH");
        assert_eq!(p.ip_ranges()[0].cidr_ip(), Some("203.0.113.7/32"));
        assert!(p.ipv6_ranges().is_empty());
    }

    #[tokio::test]
    async fn a_box_that_never_answers_points_at_its_ec2_console() {
        let layer = Layer::from_flags([("cloud", Some("aws".to_string())), ("region", Some("eu-west-1".to_string()))]);
        let s = Settings::resolve(&layer).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let aws = Aws::new(Spec::of(&s), tmp.path().to_path_buf()).await;
        let hint = aws.console_hint();
        assert!(hint.contains("aws ec2 get-console-output --region eu-west-1"), "{hint}");
        assert!(!hint.contains("console.log"), "not the local box's file: {hint}");
    }
}
