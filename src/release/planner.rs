//! The upgrade planner: from one Sourcegraph release to another, which kind of upgrade it is and
//! which migrator runs through which waypoints. Pure: it reads only the catalog.
//!
//! Sourcegraph's rules (see README "Upgrade rules"):
//! - a *standard* upgrade is one minor up, a patch within a minor, or the first minor of the next
//!   major from the last minor of the previous one; the new release's `migrator up` does the work;
//! - anything larger is a *multi-version* upgrade: the application stops and the migrator runs
//!   `upgrade --from --to`; it is supported only from 3.20 on;
//! - Postgres 16 arrived in 5.10 (the DB containers run pg_upgrade on their first start), and
//!   migrators from 6.0 on will not connect to Postgres 12, so ≤ 5.9 → ≥ 6.0 passes 5.11 (or 5.10);
//! - 7.0 removed the Postgres 12 → 16 entrypoint, so a box still on Postgres 12 stops at 6.x first;
//! - waypoints are always the newest patch of their minor; downgrades need an explicit opt-in and
//!   never cross back over the Postgres 16 line.

use serde::Serialize;

use crate::error::UserError;
use crate::release::catalog::{postgres_major_for, Catalog, PG16_FIRST};
use crate::release::version::Version;

/// Oldest release the migrator's multi-version upgrade supports.
pub const MVU_MIN: Version = Version::new(3, 20, 0);
/// First release whose migrator refuses to connect to Postgres 12.
const MIGRATOR_NEEDS_PG16: Version = Version::new(6, 0, 0);
/// First release whose DB images no longer upgrade Postgres 12 data.
const NO_PG12_UPGRADE: Version = Version::new(7, 0, 0);

#[derive(Debug, Clone, Copy)]
pub struct PlanRequest {
    pub from: Version,
    pub to: Version,
    /// Postgres major of the box's built-in DBs when known (read from the box); otherwise implied
    /// by `from`.
    pub postgres_major: Option<u32>,
    pub allow_downgrade: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradeKind {
    /// Already at the target.
    None,
    /// Render the target release and restart; its `migrator up` migrates.
    Standard,
    /// Stop the application; `migrator upgrade --from --to` through each hop; start the target.
    MultiVersion,
    /// Explicitly allowed: `migrator downgrade --from --to`, then start the target.
    Downgrade,
}

/// One migrator run of a multi-version upgrade or downgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Hop {
    pub from: Version,
    pub to: Version,
    /// The release whose migrator image runs this hop.
    pub migrator: Version,
    /// The release whose database images run during this hop.
    pub db_images: Version,
    /// The DB containers convert Postgres 12 data to 16 when they first start in this hop.
    pub postgres_upgrade: bool,
    pub why: String,
}

impl Hop {
    /// The migrator's arguments for this hop.
    pub fn migrator_args(&self, downgrade: bool) -> Vec<String> {
        vec![if downgrade { "downgrade" } else { "upgrade" }.to_string(), format!("--from=v{}", self.from), format!("--to=v{}", self.to)]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct UpgradePlan {
    pub from: Version,
    pub to: Version,
    pub kind: UpgradeKind,
    pub hops: Vec<Hop>,
    /// Somewhere on this path the built-in databases go from Postgres 12 to 16: downtime grows
    /// (~2.5 h per TB) and the disk must hold twice the databases.
    pub postgres_upgrade: bool,
    pub downtime: &'static str,
    pub notes: Vec<String>,
}

pub fn plan(catalog: &Catalog, req: PlanRequest) -> Result<UpgradePlan, UserError> {
    let PlanRequest { from, to, .. } = req;
    let pg_from = req.postgres_major.unwrap_or_else(|| postgres_major_for(from));
    if pg_from != 12 && pg_from != 16 {
        return Err(UserError::field("postgres", format!("Postgres {pg_from} is not one Sourcegraph ships"))
            .hint("the built-in databases are Postgres 12 (before 5.10) or 16"));
    }
    let target = catalog.get(to).ok_or_else(|| {
        UserError::field("to", format!("{to} is not a known docker-compose release"))
            .hint(format!("nearest known releases: {}", join(&catalog.nearest(to))))
    })?;
    let mut notes = Vec::new();
    if let Some(newest) = catalog.latest_of_minor(to.major, to.minor) {
        if newest.version > to {
            notes.push(format!("{} is the newest patch of {}.{}; consider it instead", newest.version, to.major, to.minor));
        }
    }

    if from == to {
        return Ok(UpgradePlan { from, to, kind: UpgradeKind::None, hops: vec![], postgres_upgrade: false, downtime: "none", notes });
    }
    if to < from {
        return plan_downgrade(req, pg_from, notes);
    }

    let standard = from.minor_key() == to.minor_key()
        || to.minor_key() == (from.major, from.minor + 1)
        || (to.major == from.major + 1 && to.minor == 0 && catalog.last_minor_of_major(from.major) == Some(from.minor_key()));
    // A standard step is only safe when its DB images can take the box's Postgres data as it is.
    let pg_ok_for_standard = pg_from == 16 || to < NO_PG12_UPGRADE;
    if standard && pg_ok_for_standard {
        let postgres_upgrade = pg_from == 12 && postgres_major_for(to) == 16;
        return Ok(UpgradePlan {
            from,
            to,
            kind: UpgradeKind::Standard,
            hops: vec![],
            postgres_upgrade,
            downtime: if postgres_upgrade {
                "long: the databases convert from Postgres 12 to 16 (about 2.5 h per TB)"
            } else {
                "brief: services restart one by one"
            },
            notes,
        });
    }

    if from < MVU_MIN {
        return Err(UserError::field("from", format!("multi-version upgrades start at {}.{}; {from} is older", MVU_MIN.major, MVU_MIN.minor))
            .hint("upgrade the instance to 3.20 or later one minor at a time first, then run this again"));
    }

    let latest_migrator = catalog.latest().version;
    let mut hops = Vec::new();
    let mut at = from;
    let mut pg = pg_from;
    if pg == 12 && to >= MIGRATOR_NEEDS_PG16 {
        // The Postgres 16 conversion must run under DB images that still carry it (5.10 … 6.x),
        // with a migrator that still talks to the data before the conversion.
        let waypoint = if at < PG16_FIRST {
            catalog.latest_of_minor(5, 11).or_else(|| catalog.latest_of_minor(5, 10))
        } else {
            catalog.last_minor_of_major(6).and_then(|(a, b)| catalog.latest_of_minor(a, b))
        }
        .ok_or_else(|| UserError::new("the catalog lacks the Postgres 16 waypoint release (5.10/5.11 or 6.x)"))?;
        let why = if at < PG16_FIRST {
            format!("migrators from 6.0 on do not connect to Postgres 12: {} converts the databases to Postgres 16 first", waypoint.version)
        } else {
            format!("7.0 removed the Postgres 12 → 16 conversion: the box converts at {} first", waypoint.version)
        };
        hops.push(Hop { from: at, to: waypoint.version, migrator: waypoint.version, db_images: waypoint.version, postgres_upgrade: true, why });
        at = waypoint.version;
        pg = 16;
    }
    if at < to {
        let postgres_upgrade = pg == 12 && postgres_major_for(to) == 16;
        // Before 6.0 the target's own migrator runs the hop (it still reads Postgres 12 data);
        // from 6.0 on Sourcegraph asks for the newest migrator.
        let migrator = if to < MIGRATOR_NEEDS_PG16 { to } else { latest_migrator.max(to) };
        hops.push(Hop {
            from: at,
            to,
            migrator,
            db_images: to,
            postgres_upgrade,
            why: if hops.is_empty() { "more than one minor: migrate all schemas in one run".into() } else { format!("then on to {to}") },
        });
    }
    let postgres_upgrade = hops.iter().any(|h| h.postgres_upgrade);
    notes.push(format!("{} starts with its own `migrator up` after the last hop", target.version));
    Ok(UpgradePlan {
        from,
        to,
        kind: UpgradeKind::MultiVersion,
        hops,
        postgres_upgrade,
        downtime: if postgres_upgrade {
            "full, long: application stopped; databases convert from Postgres 12 to 16 (about 2.5 h per TB)"
        } else {
            "full: application stopped while the migrator runs"
        },
        notes,
    })
}

fn plan_downgrade(req: PlanRequest, pg_from: u32, notes: Vec<String>) -> Result<UpgradePlan, UserError> {
    let PlanRequest { from, to, allow_downgrade, .. } = req;
    if !allow_downgrade {
        return Err(UserError::field("to", format!("{to} is older than the deployed {from}: downgrades are refused"))
            .hint("pass --allow-downgrade to plan a migrator downgrade, or restore the pre-upgrade snapshot with `sgbox rollback`"));
    }
    if pg_from == 16 && postgres_major_for(to) == 12 {
        return Err(UserError::field("to", format!("{to} runs Postgres 12 but the box's databases are Postgres 16; they cannot go back"))
            .hint("restore a snapshot taken before the Postgres 16 upgrade instead (`sgbox rollback`)"));
    }
    let hops = if from.minor_key() == to.minor_key() {
        vec![]
    } else {
        vec![Hop {
            from,
            to,
            migrator: from,
            db_images: to,
            postgres_upgrade: false,
            why: "explicitly allowed downgrade: the newer migrator knows how to undo its migrations".into(),
        }]
    };
    Ok(UpgradePlan {
        from,
        to,
        kind: UpgradeKind::Downgrade,
        hops,
        postgres_upgrade: false,
        downtime: "full: application stopped while the migrator runs",
        notes,
    })
}

fn join(v: &[Version]) -> String {
    v.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::catalog::catalog;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn req(from: &str, to: &str) -> PlanRequest {
        PlanRequest { from: v(from), to: v(to), postgres_major: None, allow_downgrade: false }
    }

    /// (from, to, kind, [(hop from, hop to, migrator, pg upgrade)], plan-level pg upgrade)
    #[test]
    fn table_of_cases() {
        use UpgradeKind::*;
        #[rustfmt::skip]
        #[allow(clippy::type_complexity)]
        let cases: &[(&str, &str, UpgradeKind, &[(&str, &str, &str, bool)], bool)] = &[
            // same release, patch, one minor
            ("7.5.4453", "7.5.4453", None, &[], false),
            ("7.5.0", "7.5.4453", Standard, &[], false),
            ("7.4.0", "7.5.4453", Standard, &[], false),
            ("6.11.5639", "6.12.5040", Standard, &[], false),
            // next major directly after the last minor of the previous major
            ("6.12.5040", "7.0.2852", Standard, &[], false),
            ("5.11.6271", "6.0.12741", Standard, &[], false),
            // the Postgres 16 release as a standard step converts the DBs
            ("5.9.17785", "5.10.3940", Standard, &[], true),
            // not directly after: 6.11 is not the last 6.x minor
            ("6.11.5639", "7.0.2852", MultiVersion, &[("6.11.5639", "7.0.2852", "7.5.4453", false)], false),
            // two minors: multi-version with the newest migrator
            ("7.3.2527", "7.5.4453", MultiVersion, &[("7.3.2527", "7.5.4453", "7.5.4453", false)], false),
            ("6.0.12741", "7.5.4453", MultiVersion, &[("6.0.12741", "7.5.4453", "7.5.4453", false)], false),
            // Postgres 12 boxes to ≥ 6.0 go through the newest 5.11 first
            ("5.9.17785", "6.1.5633", MultiVersion, &[("5.9.17785", "5.11.6271", "5.11.6271", true), ("5.11.6271", "6.1.5633", "7.5.4453", false)], true),
            ("5.0.0", "7.5.4453", MultiVersion, &[("5.0.0", "5.11.6271", "5.11.6271", true), ("5.11.6271", "7.5.4453", "7.5.4453", false)], true),
            ("4.5.1", "7.5.4453", MultiVersion, &[("4.5.1", "5.11.6271", "5.11.6271", true), ("5.11.6271", "7.5.4453", "7.5.4453", false)], true),
            // within the Postgres 12 → 16 window the target's own migrator does the conversion hop
            ("5.2.7", "5.10.3940", MultiVersion, &[("5.2.7", "5.10.3940", "5.10.3940", true)], true),
            ("5.8.1579", "5.11.6271", MultiVersion, &[("5.8.1579", "5.11.6271", "5.11.6271", true)], true),
            // exactly 3.20 may start a multi-version upgrade
            ("3.20.0", "5.1.9", MultiVersion, &[("3.20.0", "5.1.9", "5.1.9", false)], false),
        ];
        let c = catalog();
        for (from, to, kind, hops, pg) in cases {
            let p = plan(c, req(from, to)).unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
            assert_eq!(p.kind, *kind, "{from} -> {to}");
            let got: Vec<(String, String, String, bool)> =
                p.hops.iter().map(|h| (h.from.to_string(), h.to.to_string(), h.migrator.to_string(), h.postgres_upgrade)).collect();
            let want: Vec<(String, String, String, bool)> =
                hops.iter().map(|(a, b, m, u)| (a.to_string(), b.to_string(), m.to_string(), *u)).collect();
            assert_eq!(got, want, "{from} -> {to}");
            assert_eq!(p.postgres_upgrade, *pg, "{from} -> {to}");
            // Every waypoint is the newest patch of its minor.
            for h in &p.hops[..p.hops.len().saturating_sub(1)] {
                assert_eq!(c.latest_of_minor(h.to.major, h.to.minor).unwrap().version, h.to);
            }
        }
    }

    #[test]
    fn box_still_on_postgres_12_stops_at_6x_before_7() {
        let c = catalog();
        let p = plan(c, PlanRequest { postgres_major: Some(12), ..req("6.10.3349", "7.5.4453") }).unwrap();
        assert_eq!(p.hops.len(), 2);
        assert_eq!(p.hops[0].to.major, 6);
        assert_eq!(p.hops[0].to, c.latest_of_minor(6, 12).unwrap().version);
        assert!(p.hops[0].postgres_upgrade && p.hops[0].why.contains("7.0"));
        // A standard step into 7.0 is not enough for such a box either.
        let p = plan(c, PlanRequest { postgres_major: Some(12), ..req("6.12.5040", "7.0.2852") }).unwrap();
        assert_eq!(p.kind, UpgradeKind::MultiVersion);
        assert_eq!(p.hops[0].to, Version::new(6, 12, 5040));
    }

    #[test]
    fn refusals() {
        let c = catalog();
        let e = plan(c, req("3.19.2", "5.1.9")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("from"));
        assert!(e.to_string().contains("3.20"), "{e}");
        let e = plan(c, req("7.5.4453", "7.4.0")).unwrap_err();
        assert!(e.to_string().contains("--allow-downgrade"), "{e}");
        let e = plan(c, req("7.5.4453", "7.5.1")).unwrap_err();
        assert!(e.to_string().contains("7.5.4453") && e.to_string().contains("not a known"), "{e}");
        let e = plan(c, PlanRequest { allow_downgrade: true, ..req("5.10.3940", "5.9.17785") }).unwrap_err();
        assert!(e.to_string().contains("Postgres 16"), "{e}");
        let e = plan(c, PlanRequest { postgres_major: Some(14), ..req("7.4.0", "7.5.4453") }).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("postgres"));
    }

    #[test]
    fn allowed_downgrade_uses_the_newer_migrator() {
        let c = catalog();
        let p = plan(c, PlanRequest { allow_downgrade: true, ..req("7.5.4453", "7.3.2527") }).unwrap();
        assert_eq!(p.kind, UpgradeKind::Downgrade);
        assert_eq!(p.hops[0].migrator, v("7.5.4453"));
        assert_eq!(p.hops[0].migrator_args(true), vec!["downgrade", "--from=v7.5.4453", "--to=v7.3.2527"]);
    }

    #[test]
    fn patch_note_when_not_newest() {
        let p = plan(catalog(), req("7.4.0", "7.5.0")).unwrap();
        assert!(p.notes.iter().any(|n| n.contains("7.5.4453")), "{:?}", p.notes);
    }
}
