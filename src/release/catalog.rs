//! The Sourcegraph release catalog: every official docker-compose release (5.0.0 onward) with each
//! service's image, tag and digest, embedded at build time from `data/`.
//!
//! The catalog is data, not code: rendering follows it (the service set changes across releases),
//! and version specs resolve against it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use indexmap::IndexMap;
use serde::Deserialize;

use crate::error::UserError;
use crate::release::version::{Version, VersionSpec};

const CATALOG_JSON: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/sourcegraph-compose-releases.json"));

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    /// Registry host, e.g. `index.docker.io`.
    pub registry: String,
    /// Repository path below the registry, e.g. `sourcegraph/frontend` or `caddy`.
    pub image: String,
    pub tag: String,
    pub digest: String,
}

impl ImageRef {
    /// The reference exactly as the official compose file writes it.
    pub fn official(&self) -> String {
        format!("{}/{}:{}@{}", self.registry, self.image, self.tag, self.digest)
    }

    /// Last path component of the repository (`frontend` for `sourcegraph/frontend`): the name a
    /// mirror serves the image under.
    pub fn short_name(&self) -> &str {
        self.image.rsplit('/').next().unwrap_or(&self.image)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelease {
    #[allow(dead_code)]
    compose_file_version: String,
    services: IndexMap<String, ImageRef>,
    volumes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[allow(dead_code)]
    source: String,
    releases: IndexMap<String, RawRelease>,
}

#[derive(Debug)]
pub struct Release {
    pub version: Version,
    /// Services in the order of the official compose file.
    pub services: IndexMap<String, ImageRef>,
    pub volumes: Vec<String>,
}

impl Release {
    pub fn has(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    /// Major version of the bundled Postgres: 5.10 moved the built-in databases to Postgres 16.
    pub fn postgres_major(&self) -> u32 {
        match self.services.get("pgsql") {
            Some(img) if img.short_name().starts_with("postgresql-16") => 16,
            Some(_) => 12,
            None => postgres_major_for(self.version),
        }
    }
}

/// The Postgres major a release of Sourcegraph runs with its built-in databases.
pub fn postgres_major_for(v: Version) -> u32 {
    if v >= PG16_FIRST {
        16
    } else {
        12
    }
}

/// First release whose built-in databases are Postgres 16 (their first boot runs pg_upgrade).
pub const PG16_FIRST: Version = Version::new(5, 10, 0);

pub struct Catalog {
    releases: BTreeMap<Version, Release>,
}

static CATALOG: OnceLock<Catalog> = OnceLock::new();

/// The embedded catalog. Parsing is checked by a unit test, so a bad data file fails the build's
/// tests rather than a user's run.
pub fn catalog() -> &'static Catalog {
    CATALOG.get_or_init(|| Catalog::parse(CATALOG_JSON).expect("embedded release catalog is valid"))
}

impl Catalog {
    pub fn parse(json: &str) -> anyhow::Result<Catalog> {
        let raw: RawCatalog = serde_json::from_str(json)?;
        let mut releases = BTreeMap::new();
        for (key, r) in raw.releases {
            let version: Version = key.parse()?;
            anyhow::ensure!(!r.services.is_empty(), "release {key} has no services");
            releases.insert(version, Release { version, services: r.services, volumes: r.volumes });
        }
        anyhow::ensure!(!releases.is_empty(), "catalog has no releases");
        Ok(Catalog { releases })
    }

    pub fn all(&self) -> impl DoubleEndedIterator<Item = &Release> {
        self.releases.values()
    }

    pub fn latest(&self) -> &Release {
        self.releases.values().next_back().expect("catalog is not empty")
    }

    pub fn get(&self, v: Version) -> Option<&Release> {
        self.releases.get(&v)
    }

    /// Newest patch of a minor.
    pub fn latest_of_minor(&self, major: u32, minor: u32) -> Option<&Release> {
        self.releases.range(Version::new(major, minor, 0)..=Version::new(major, minor, u32::MAX)).next_back().map(|(_, r)| r)
    }

    /// Newest minor of a major, as (major, minor).
    pub fn last_minor_of_major(&self, major: u32) -> Option<(u32, u32)> {
        self.releases.range(Version::new(major, 0, 0)..=Version::new(major, u32::MAX, u32::MAX)).next_back().map(|(v, _)| v.minor_key())
    }

    /// Distinct minors in the catalog, oldest first.
    pub fn minors(&self) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = self.releases.keys().map(|v| v.minor_key()).collect();
        out.dedup();
        out
    }

    pub fn resolve(&self, spec: VersionSpec) -> Result<&Release, UserError> {
        match spec {
            VersionSpec::Latest => Ok(self.latest()),
            VersionSpec::Minor(a, b) => self.latest_of_minor(a, b).ok_or_else(|| {
                UserError::field("version", format!("Sourcegraph {a}.{b} has no docker-compose release in the catalog"))
                    .hint(format!("known minors near it: {}", self.nearest_minors(a, b).join(", ")))
            }),
            VersionSpec::Exact(v) => self.get(v).ok_or_else(|| {
                UserError::field("version", format!("Sourcegraph {v} is not a known docker-compose release")).hint(format!(
                    "nearest known releases: {} (or ask for the minor, e.g. {}.{}, to get its newest patch)",
                    self.nearest(v).iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "),
                    v.major,
                    v.minor
                ))
            }),
        }
    }

    /// Up to three known releases on each side of `v`.
    pub fn nearest(&self, v: Version) -> Vec<Version> {
        let below = self.releases.range(..v).rev().take(3).map(|(k, _)| *k);
        let above = self.releases.range(v..).take(3).map(|(k, _)| *k);
        let mut out: Vec<Version> = below.chain(above).collect();
        out.sort();
        out
    }

    fn nearest_minors(&self, major: u32, minor: u32) -> Vec<String> {
        let minors = self.minors();
        let pos = minors.partition_point(|m| *m < (major, minor));
        let lo = pos.saturating_sub(2);
        let hi = (pos + 2).min(minors.len());
        minors[lo..hi].iter().map(|(a, b)| format!("{a}.{b}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_catalog_parses_and_spans_5_0_to_7_5() {
        let c = catalog();
        assert_eq!(c.all().next().unwrap().version, Version::new(5, 0, 0));
        assert_eq!(c.latest().version, Version::new(7, 5, 4453));
        assert!(c.all().count() > 100);
        for r in c.all() {
            assert!(r.has("migrator") && r.has("pgsql") && r.has("sourcegraph-frontend-0"), "{}", r.version);
            for img in r.services.values() {
                assert!(img.digest.starts_with("sha256:") && img.digest.len() == 71, "{}", r.version);
            }
        }
    }

    #[test]
    fn resolves_specs() {
        let c = catalog();
        assert_eq!(c.resolve(VersionSpec::Minor(7, 5)).unwrap().version, Version::new(7, 5, 4453));
        assert_eq!(c.resolve(VersionSpec::Minor(5, 3)).unwrap().version, Version::new(5, 3, 16323));
        assert_eq!(c.resolve(VersionSpec::Latest).unwrap().version, Version::new(7, 5, 4453));
        let e = c.resolve(VersionSpec::Exact(Version::new(7, 5, 1))).unwrap_err().to_string();
        assert!(e.contains("7.5.0") && e.contains("7.5.4453"), "{e}");
        let e = c.resolve(VersionSpec::Minor(7, 9)).unwrap_err().to_string();
        assert!(e.contains("7.5"), "{e}");
    }

    #[test]
    fn postgres_major_follows_db_images() {
        let c = catalog();
        assert_eq!(c.resolve(VersionSpec::Minor(5, 9)).unwrap().postgres_major(), 12);
        assert_eq!(c.resolve(VersionSpec::Minor(5, 10)).unwrap().postgres_major(), 16);
        for r in c.all() {
            assert_eq!(r.postgres_major(), postgres_major_for(r.version), "{}", r.version);
        }
    }
}
