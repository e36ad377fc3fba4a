//! Read-only facts for the interactive provisioner, asked before any deployment exists: the
//! region AWS's own configuration names, the zones that offer a machine type, and whose
//! credentials these are. Never IMDS: the wizard runs where a person types, not on an instance.

use std::time::Duration;

use aws_config::meta::region::ProvideRegion;
use aws_sdk_ec2::types::{Filter, LocationType};

use super::{api, Aws};
use crate::cloud::Result;

/// How long one lookup may take: a question waits on it.
const LOOKUP: Duration = Duration::from_secs(15);

/// The region from AWS_REGION, AWS_DEFAULT_REGION or the profile, and where it was found.
pub async fn configured_region() -> Option<(String, String)> {
    for var in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
        if let Some(r) = std::env::var(var).ok().map(|r| r.trim().to_string()).filter(|r| !r.is_empty()) {
            return Some((r, format!("from {var}")));
        }
    }
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let found = tokio::time::timeout(LOOKUP, aws_config::profile::ProfileFileRegionProvider::builder().build().region()).await.ok().flatten()?;
    Some((found.to_string(), format!("the region of AWS profile {profile}")))
}

/// `call` within [`LOOKUP`]: past it, a timeout naming `op`.
async fn bounded<T>(op: &str, call: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(LOOKUP, call).await.map_err(|_| crate::cloud::CloudError::Timeout { what: op.into(), waited: LOOKUP })
}

async fn config(region: &str) -> aws_config::SdkConfig {
    Aws::loader().region(aws_config::Region::new(region.to_string())).load().await
}

/// The zones of `region` that offer `instance_type`, sorted.
pub async fn zones_offering(region: &str, instance_type: &str) -> Result<Vec<String>> {
    let ec2 = aws_sdk_ec2::Client::new(&config(region).await);
    let call = ec2
        .describe_instance_type_offerings()
        .location_type(LocationType::AvailabilityZone)
        .filters(Filter::builder().name("instance-type").values(instance_type).build())
        .send();
    let out = bounded("DescribeInstanceTypeOfferings", call).await?.map_err(api("DescribeInstanceTypeOfferings"))?;
    let mut zones: Vec<String> = out.instance_type_offerings().iter().filter_map(|o| o.location().map(str::to_string)).collect();
    zones.sort();
    zones.dedup();
    Ok(zones)
}

/// The account and principal (ARN) the credentials belong to (STS GetCallerIdentity).
pub async fn caller(region: &str) -> Result<(String, String)> {
    let sts = aws_sdk_sts::Client::new(&config(region).await);
    let out = bounded("GetCallerIdentity", sts.get_caller_identity().send()).await?.map_err(api("GetCallerIdentity"))?;
    Ok((out.account().unwrap_or_default().to_string(), out.arn().unwrap_or_default().to_string()))
}
