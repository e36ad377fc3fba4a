//! The upgrade journal: the ordered steps of one upgrade, derived from the planner's plan, with
//! what is done, kept on the box (`/var/lib/sgbox/upgrade.json`) so that a re-run after a dropped
//! connection or a crash resumes at the first unfinished step. Pure: no I/O here; the upgrade
//! engine (`stack::upgrade`) reads and writes it over SSH.
//!
//! Rollback depends on how far it got: before anything changed, nothing to undo; once the compose
//! files were swapped, restore the previous ones; once a migrator ran (a standard upgrade's
//! `migrator up` included), the databases changed too, so the data-disk snapshot comes back.
use serde::{Deserialize, Serialize};

use crate::release::planner::{Hop, UpgradeKind, UpgradePlan};
use crate::release::version::Version;

pub const PATH_ON_BOX: &str = "/var/lib/sgbox/upgrade.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Healthy at the recorded release, legal path, disk, Docker/Compose, registry.
    Preflight,
    /// Data-disk snapshot through the provider.
    Snapshot,
    /// Pull every image the path needs while the old release serves.
    Pull,
    /// Stop the application (multi-version): only the databases keep running.
    StopApplication,
    /// One `migrator upgrade --from --to` run.
    Migrate { from: Version, to: Version, migrator: Version },
    /// Install the target's compose files and bring it up (its `migrator up` runs first).
    Apply,
    /// Migrator exited 0, every service healthy, `/__version` is the target.
    Verify,
    /// The new release in /etc/sgbox and the state file, with a history entry.
    Record,
}

impl Step {
    /// After this step starts, the databases may have changed: only the snapshot undoes it.
    pub fn touches_data(&self) -> bool {
        matches!(self, Step::Migrate { .. } | Step::Apply)
    }

    /// After this step starts, the compose files on the box are no longer the old release's.
    pub fn touches_files(&self) -> bool {
        matches!(self, Step::StopApplication | Step::Migrate { .. } | Step::Apply)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Pending,
    Started,
    Done,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(flatten)]
    pub step: Step,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub format: u32,
    pub id: String,
    pub from: Version,
    pub to: Version,
    pub kind: UpgradeKind,
    /// The migrator runs as planned when the upgrade started (format 2 on): a resume follows
    /// them, not a new plan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<Hop>,
    pub steps: Vec<Entry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub started_at: String,
    #[serde(default)]
    pub started_by: String,
    /// Set once it is over: `done`, or `rolled-back` (automatically or by `sgbox rollback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// What a rollback has to do, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Undo {
    /// Stop the stack (so the data disk is quiet before a restore).
    StopStack,
    /// Put the previous release's compose files back (before any restart can start the new one).
    RestorePrevious(Version),
    /// Put the data disk back to the pre-upgrade snapshot (the box restarts).
    RestoreSnapshot(String),
    /// Start the previous release; every service healthy and `/__version` answers it again.
    VerifyPrevious(Version),
}

impl Journal {
    pub fn new(id: impl Into<String>, plan: &UpgradePlan) -> Journal {
        let mut steps = vec![Step::Preflight, Step::Snapshot, Step::Pull];
        if matches!(plan.kind, UpgradeKind::MultiVersion | UpgradeKind::Downgrade) {
            steps.push(Step::StopApplication);
            steps.extend(plan.hops.iter().map(|h| Step::Migrate { from: h.from, to: h.to, migrator: h.migrator }));
        }
        steps.extend([Step::Apply, Step::Verify, Step::Record]);
        Journal {
            format: 2,
            id: id.into(),
            from: plan.from,
            to: plan.to,
            kind: plan.kind,
            hops: plan.hops.clone(),
            steps: steps.into_iter().map(|step| Entry { step, status: Status::Pending, at: None, detail: None }).collect(),
            snapshot: None,
            started_at: String::new(),
            started_by: String::new(),
            outcome: None,
        }
    }

    /// Still to be driven: neither finished nor rolled back.
    pub fn open(&self) -> bool {
        self.outcome.is_none()
    }

    /// The first step not done: where a (re-)run continues. A step that was started but not
    /// finished runs again, so every step must be safe to repeat.
    pub fn next(&self) -> Option<(usize, &Step)> {
        self.steps.iter().enumerate().find(|(_, e)| e.status != Status::Done).map(|(i, e)| (i, &e.step))
    }

    #[cfg(test)]
    pub fn finished(&self) -> bool {
        self.next().is_none()
    }

    pub fn failed(&self) -> bool {
        self.steps.iter().any(|e| e.status == Status::Failed)
    }

    pub fn mark(&mut self, index: usize, status: Status, at: &str, detail: Option<String>) {
        let e = &mut self.steps[index];
        e.status = status;
        e.at = Some(at.to_string());
        if detail.is_some() {
            e.detail = detail;
        }
    }

    /// Undo what the steps begun so far did; nothing when nothing changed.
    pub fn undo_plan(&self) -> Vec<Undo> {
        let begun = |f: fn(&Step) -> bool| self.steps.iter().any(|e| e.status != Status::Pending && f(&e.step));
        let mut undo = Vec::new();
        let data = begun(Step::touches_data);
        if !data && !begun(Step::touches_files) {
            return undo;
        }
        undo.push(Undo::StopStack);
        undo.push(Undo::RestorePrevious(self.from));
        if data {
            if let Some(s) = &self.snapshot {
                undo.push(Undo::RestoreSnapshot(s.clone()));
            }
        }
        undo.push(Undo::VerifyPrevious(self.from));
        undo
    }

    /// Would a rollback need a snapshot it does not have?
    pub fn data_at_risk(&self) -> bool {
        self.snapshot.is_none() && self.steps.iter().any(|e| e.status != Status::Pending && e.step.touches_data())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::catalog::catalog;
    use crate::release::planner::{plan, PlanRequest};

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn journal(from: &str, to: &str) -> Journal {
        let p = plan(catalog(), PlanRequest { from: v(from), to: v(to), postgres_major: None, allow_downgrade: false }).unwrap();
        Journal::new("u1", &p)
    }

    fn names(j: &Journal) -> Vec<String> {
        j.steps
            .iter()
            .map(|e| match &e.step {
                Step::Migrate { from, to, .. } => format!("migrate {from}->{to}"),
                other => serde_json::to_value(other).unwrap()["step"].as_str().unwrap().to_string(),
            })
            .collect()
    }

    #[test]
    fn steps_follow_the_kind_of_upgrade() {
        let std = journal("7.4.0", "7.5.4453");
        assert_eq!(std.kind, UpgradeKind::Standard);
        assert_eq!(names(&std), ["preflight", "snapshot", "pull", "apply", "verify", "record"]);

        let mvu = journal("5.9.17785", "7.5.4453");
        assert_eq!(mvu.kind, UpgradeKind::MultiVersion);
        let n = names(&mvu);
        assert_eq!(n[..4], ["preflight", "snapshot", "pull", "stop-application"]);
        assert!(n[4].starts_with("migrate 5.9.17785->5.11."), "the Postgres 16 waypoint first: {n:?}");
        assert!(n[5].ends_with("->7.5.4453"), "{n:?}");
        assert_eq!(n[6..], ["apply", "verify", "record"]);
    }

    #[test]
    fn resumes_at_the_first_unfinished_step_and_survives_json() {
        let mut j = journal("7.4.0", "7.5.4453");
        assert_eq!(j.next().unwrap().0, 0);
        j.mark(0, Status::Done, "t1", None);
        j.mark(1, Status::Done, "t2", Some("snap-1".into()));
        j.snapshot = Some("snap-1".into());
        j.mark(2, Status::Started, "t3", None);
        let back: Journal = serde_json::from_str(&serde_json::to_string(&j).unwrap()).unwrap();
        assert_eq!(back, j);
        assert_eq!(back.next(), Some((2, &Step::Pull)), "a started step runs again");
        assert!(PATH_ON_BOX.starts_with("/var/lib/sgbox/"), "kept on the box, outside the data the snapshot restores");
        assert!(!back.finished());
    }

    #[test]
    fn rollback_undoes_only_what_happened() {
        let mut j = journal("7.4.0", "7.5.4453");
        assert!(j.undo_plan().is_empty(), "nothing begun, nothing to undo");
        for i in 0..3 {
            j.mark(i, Status::Done, "t", None);
        }
        assert!(j.undo_plan().is_empty(), "preflight, snapshot and pull change nothing the old release uses");

        j.snapshot = Some("snap-1".into());
        j.mark(3, Status::Failed, "t", Some("migrator exited 1".into()));
        assert!(j.failed());
        let from = v("7.4.0");
        assert_eq!(
            j.undo_plan(),
            vec![Undo::StopStack, Undo::RestorePrevious(from), Undo::RestoreSnapshot("snap-1".into()), Undo::VerifyPrevious(from)],
            "the old files go back before the restore restarts the box, so it boots the old release"
        );
        j.snapshot = None;
        assert!(j.data_at_risk(), "migrations ran without a snapshot");

        let mut m = journal("5.9.17785", "7.5.4453");
        for i in 0..4 {
            m.mark(i, Status::Done, "t", None);
        }
        let from = v("5.9.17785");
        assert_eq!(m.undo_plan(), vec![Undo::StopStack, Undo::RestorePrevious(from), Undo::VerifyPrevious(from)], "stopped, but no migrator ran yet");
    }
}
