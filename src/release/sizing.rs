//! Size tiers (Sourcegraph's XS … XL table) and the machine each cloud gets for them.
//!
//! Sourcegraph sizes by users and repositories; the docs map the tiers to AWS m6a and GCP
//! n2-standard machines with at least 8 vCPU / 32 GiB. The local box is for evaluation only and
//! gets a small machine of its own.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::UserError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Size {
    XS,
    S,
    M,
    L,
    XL,
}

pub const ALL_SIZES: [Size; 5] = [Size::XS, Size::S, Size::M, Size::L, Size::XL];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tier {
    pub size: Size,
    pub users: u32,
    pub repos: u32,
    pub vcpus: u32,
    pub memory_gib: u32,
    pub aws: &'static str,
    pub gcp: &'static str,
}

impl Size {
    pub fn tier(self) -> Tier {
        let (users, repos, vcpus, memory_gib, aws, gcp) = match self {
            Size::XS => (500, 1_000, 8, 32, "m6a.2xlarge", "n2-standard-8"),
            Size::S => (1_000, 10_000, 16, 64, "m6a.4xlarge", "n2-standard-16"),
            Size::M => (5_000, 50_000, 32, 128, "m6a.8xlarge", "n2-standard-32"),
            Size::L => (10_000, 100_000, 48, 192, "m6a.12xlarge", "n2-standard-48"),
            Size::XL => (20_000, 250_000, 96, 384, "m6a.24xlarge", "n2-standard-96"),
        };
        Tier { size: self, users, repos, vcpus, memory_gib, aws, gcp }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl FromStr for Size {
    type Err = UserError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL_SIZES.iter().copied().find(|z| z.to_string().eq_ignore_ascii_case(s.trim())).ok_or_else(|| {
            UserError::field("size", format!("'{s}' is not a size tier"))
                .hint("use one of XS, S, M, L, XL (Sourcegraph's sizing: XS = 500 users / 1,000 repos … XL = 20,000 users / 250,000 repos)")
        })
    }
}

/// A machine: vCPUs and memory, whatever the cloud calls it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineType {
    pub instance_type: String,
    /// Known when the type is in our table (always for tiers and local); `None` for an override
    /// the cloud will check when the instance is created.
    pub vcpus: Option<u32>,
    pub memory_gib: Option<u32>,
}

/// Minimum Sourcegraph supports on a cloud VM.
pub const MIN_VCPUS: u32 = 8;
pub const MIN_MEMORY_GIB: u32 = 32;

/// The local evaluation box: 2 vCPU / 4 GiB is enough for the stand-in services and a small trial;
/// a real Sourcegraph wants more (`--instance-type local-8x32`).
pub const LOCAL_DEFAULT: &str = "local-2x4";

/// vCPU/GiB of instance types outside the tiers that users commonly pick.
const KNOWN_TYPES: &[(&str, u32, u32)] = &[
    ("m6a.large", 2, 8),
    ("m6a.xlarge", 4, 16),
    ("m6a.2xlarge", 8, 32),
    ("m6a.4xlarge", 16, 64),
    ("m6a.8xlarge", 32, 128),
    ("m6a.12xlarge", 48, 192),
    ("m6a.16xlarge", 64, 256),
    ("m6a.24xlarge", 96, 384),
    ("m6i.2xlarge", 8, 32),
    ("m6i.4xlarge", 16, 64),
    ("m7a.2xlarge", 8, 32),
    ("m7i.2xlarge", 8, 32),
    ("m5.xlarge", 4, 16),
    ("m5.2xlarge", 8, 32),
    ("m5.4xlarge", 16, 64),
    ("t3.large", 2, 8),
    ("t3.xlarge", 4, 16),
    ("t3.2xlarge", 8, 32),
    ("r6a.2xlarge", 8, 64),
    ("c6a.2xlarge", 8, 16),
    ("n2-standard-4", 4, 16),
    ("n2-standard-8", 8, 32),
    ("n2-standard-16", 16, 64),
    ("n2-standard-32", 32, 128),
    ("n2-standard-48", 48, 192),
    ("n2-standard-64", 64, 256),
    ("n2-standard-96", 96, 384),
    ("e2-standard-8", 8, 32),
    ("e2-standard-16", 16, 64),
    ("n2d-standard-8", 8, 32),
];

/// Parse `local-<vcpus>x<GiB>`.
pub fn parse_local_type(s: &str) -> Option<(u32, u32)> {
    let rest = s.strip_prefix("local-")?;
    let (c, m) = rest.split_once('x')?;
    let (c, m): (u32, u32) = (c.parse().ok()?, m.parse().ok()?);
    ((1..=64).contains(&c) && (1..=512).contains(&m)).then_some((c, m))
}

pub fn known_type(instance_type: &str) -> Option<(u32, u32)> {
    KNOWN_TYPES.iter().find(|(t, ..)| *t == instance_type).map(|(_, c, m)| (*c, *m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_meet_the_minimum_and_grow() {
        let mut prev = 0;
        for s in ALL_SIZES {
            let t = s.tier();
            assert!(t.vcpus >= MIN_VCPUS && t.memory_gib >= MIN_MEMORY_GIB);
            assert!(t.vcpus > prev);
            prev = t.vcpus;
            assert_eq!(known_type(t.aws), Some((t.vcpus, t.memory_gib)));
            assert_eq!(known_type(t.gcp), Some((t.vcpus, t.memory_gib)));
        }
    }

    #[test]
    fn parses_sizes_and_local_types() {
        assert_eq!("xs".parse::<Size>().unwrap(), Size::XS);
        assert_eq!(" XL ".parse::<Size>().unwrap(), Size::XL);
        let e = "XXL".parse::<Size>().unwrap_err();
        assert_eq!(e.field.as_deref(), Some("size"));
        assert_eq!(parse_local_type("local-2x4"), Some((2, 4)));
        assert_eq!(parse_local_type("local-0x4"), None);
        assert_eq!(parse_local_type("m6a.large"), None);
    }
}
