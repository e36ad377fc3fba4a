//! Sourcegraph version numbers and the version specs users type (`latest`, `7.5`, `7.5.4453`).
//!
//! Sourcegraph versions are `MAJOR.MINOR.PATCH`, where PATCH is `0` for a minor release and a
//! build number for later patch releases (7.5.4453), so patches order numerically, not by date.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Version { major, minor, patch }
    }

    /// The (major, minor) pair: upgrade policy is stated in minors; patches never matter to it.
    pub fn minor_key(&self) -> (u32, u32) {
        (self.major, self.minor)
    }
}

impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a Sourcegraph version: expected MAJOR.MINOR.PATCH such as 7.5.4453")]
pub struct ParseVersionError(pub String);

fn parse_parts(s: &str) -> Option<Vec<u32>> {
    let t = s.trim();
    let t = t.strip_prefix('v').unwrap_or(t);
    if t.is_empty() {
        return None;
    }
    t.split('.')
        .map(|p| {
            // Reject signs, spaces and leading '+' that u32::from_str would accept.
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 9 {
                None
            } else {
                p.parse().ok()
            }
        })
        .collect()
}

impl FromStr for Version {
    type Err = ParseVersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match parse_parts(s).as_deref() {
            Some([a, b, c]) => Ok(Version::new(*a, *b, *c)),
            _ => Err(ParseVersionError(s.to_string())),
        }
    }
}

/// What a user asks for: the newest release, the newest patch of a minor, or one exact release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionSpec {
    Latest,
    Minor(u32, u32),
    Exact(Version),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a version: use `latest`, a minor such as 7.5, or an exact release such as 7.5.4453")]
pub struct ParseSpecError(pub String);

impl FromStr for VersionSpec {
    type Err = ParseSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("latest") {
            return Ok(VersionSpec::Latest);
        }
        match parse_parts(s).as_deref() {
            Some([a, b]) => Ok(VersionSpec::Minor(*a, *b)),
            Some([a, b, c]) => Ok(VersionSpec::Exact(Version::new(*a, *b, *c))),
            _ => Err(ParseSpecError(s.to_string())),
        }
    }
}

impl fmt::Display for VersionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionSpec::Latest => f.write_str("latest"),
            VersionSpec::Minor(a, b) => write!(f, "{a}.{b}"),
            VersionSpec::Exact(v) => v.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions_and_specs() {
        assert_eq!("7.5.4453".parse::<Version>().unwrap(), Version::new(7, 5, 4453));
        assert_eq!("v5.10.0".parse::<Version>().unwrap(), Version::new(5, 10, 0));
        assert!("7.5".parse::<Version>().is_err());
        assert!("7.5.x".parse::<Version>().is_err());
        assert!("7.+5.1".parse::<Version>().is_err());
        assert_eq!("latest".parse::<VersionSpec>().unwrap(), VersionSpec::Latest);
        assert_eq!("v7.5".parse::<VersionSpec>().unwrap(), VersionSpec::Minor(7, 5));
        assert_eq!("7.5.4453".parse::<VersionSpec>().unwrap(), VersionSpec::Exact(Version::new(7, 5, 4453)));
        assert!("7".parse::<VersionSpec>().is_err());
        assert!("".parse::<VersionSpec>().is_err());
    }

    #[test]
    fn patches_order_numerically() {
        let a: Version = "5.3.9104".parse().unwrap();
        let b: Version = "5.3.12303".parse().unwrap();
        assert!(a < b);
        assert!(Version::new(5, 9, 17785) < Version::new(5, 10, 0));
    }
}
