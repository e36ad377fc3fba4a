//! A small, dated price table for `plan`'s monthly estimate: on-demand Linux list prices of the
//! size tiers' instance types, gp3 storage and a public IPv4 address, in USD. An estimate, not a
//! quote: prices change, and taxes, data transfer and snapshots are not included.

/// When the prices below were taken from AWS's public price list.
pub const AS_OF: &str = "2026-11";
const HOURS_PER_MONTH: f64 = 730.0;

/// us-east-1 on-demand $/hour.
const AWS_HOURLY: &[(&str, f64)] =
    &[("m6a.2xlarge", 0.3456), ("m6a.4xlarge", 0.6912), ("m6a.8xlarge", 1.3824), ("m6a.12xlarge", 2.0736), ("m6a.24xlarge", 4.1472)];
/// Regions priced like us-east-1, and a few others with their factor to it.
const AWS_REGION_FACTOR: &[(&str, f64)] = &[
    ("us-east-1", 1.0),
    ("us-east-2", 1.0),
    ("us-west-2", 1.0),
    ("us-west-1", 1.17),
    ("ca-central-1", 1.11),
    ("eu-west-1", 1.12),
    ("eu-central-1", 1.2),
    ("eu-west-2", 1.17),
    ("ap-southeast-1", 1.24),
    ("ap-northeast-1", 1.29),
    ("ap-southeast-2", 1.25),
];
const GP3_PER_GB_MONTH: f64 = 0.08;
const IPV4_PER_HOUR: f64 = 0.005;
/// The root volume sgbox gives every instance.
pub const AWS_ROOT_GB: u32 = 30;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Estimate {
    pub instance: f64,
    pub storage: f64,
    pub address: f64,
    pub total: f64,
    pub as_of: &'static str,
    pub note: String,
}

/// Monthly estimate for an AWS box, or `None` when the type or region is not in the table.
pub fn aws_monthly(instance_type: &str, region: &str, data_disk_gb: u32) -> Option<Estimate> {
    let hourly = AWS_HOURLY.iter().find(|(t, _)| *t == instance_type)?.1;
    let factor = AWS_REGION_FACTOR.iter().find(|(r, _)| *r == region)?.1;
    let round = |x: f64| (x * 100.0).round() / 100.0;
    let instance = round(hourly * factor * HOURS_PER_MONTH);
    let storage = round(f64::from(data_disk_gb + AWS_ROOT_GB) * GP3_PER_GB_MONTH * factor);
    let address = round(IPV4_PER_HOUR * HOURS_PER_MONTH);
    Some(Estimate {
        instance,
        storage,
        address,
        total: round(instance + storage + address),
        as_of: AS_OF,
        note: format!("on-demand list prices as of {AS_OF}, {region}; excludes data transfer, snapshots and taxes"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xs_in_us_east_1() {
        let e = aws_monthly("m6a.2xlarge", "us-east-1", 250).unwrap();
        assert_eq!(e.instance, 252.29);
        assert_eq!(e.storage, 22.4);
        assert_eq!(e.address, 3.65);
        assert_eq!(e.total, 278.34);
        assert!(aws_monthly("m6a.2xlarge", "af-south-1", 250).is_none(), "unknown regions are not guessed");
        assert!(aws_monthly("c7i.large", "us-east-1", 250).is_none());
        assert!(aws_monthly("m6a.24xlarge", "eu-central-1", 250).unwrap().total > e.total * 10.0);
    }
}
