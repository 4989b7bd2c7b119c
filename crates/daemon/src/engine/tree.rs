//! The tree engine ([`dmm_tree::TreeMigration`]) behind the [`Engine`]
//! interface.
//!
//! The tree engine runs on its own threads once opened: the access point
//! is mounted and the workers copy. This wraps it in the shape the
//! supervisor drives every migration in: open (mount, resuming from the
//! journal), run (watch until everything is migrated, then verify),
//! progress, close (workers stopped, access point unmounted, resumable),
//! commit (unmounted for good, the target a plain tree).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dmm_catalog::{Kind, State};
use dmm_control::Controls;
use dmm_tree::{TreeMigration, TreeProgress};
use parking_lot::Mutex;
use serde::Serialize;

use super::{Engine, Ran, Report, Snapshot};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::{Spec, TreeSpec};

/// How often the run loop looks at the engine.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Where a tree migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TreePhase {
    /// Entries still to migrate (background workers and on demand).
    Migrating,
    /// Everything is migrated; checksums being compared.
    Verifying,
    /// Everything is migrated and verified: ready to commit.
    Verified,
}

/// What `dmm stat` shows for a tree migration.
#[derive(Debug, Clone, Serialize)]
pub struct TreeReport {
    pub kind: Kind,
    pub phase: TreePhase,
    pub paused: bool,
    #[serde(flatten)]
    pub progress: TreeProgress,
    /// Files whose checksums were compared, once verified.
    pub verified_files: u64,
    /// Files whose target copy differs from the source.
    pub mismatches: Vec<String>,
}

/// An open tree migration.
pub struct TreeEngine {
    engine: Arc<TreeMigration>,
    verify: bool,
    phase: Mutex<TreePhase>,
    verified_files: Mutex<u64>,
    mismatches: Mutex<Vec<String>>,
    /// Per-file errors already written to the migration's log.
    logged_errors: Mutex<HashSet<(String, u32)>>,
}

fn failed(err: dmm_tree::Error) -> Error {
    Error::caused(ErrorKind::Failed, "the tree engine failed", err)
}

/// Checks source, target and access point of a new migration.
pub fn check(spec: &TreeSpec) -> Result<()> {
    dmm_tree::check(&spec.config, true)
        .map_err(|err| Error::new(ErrorKind::Invalid, err.to_string()))
}

impl TreeEngine {
    /// Opens the journal in `dir` (finishing what a crash interrupted),
    /// mounts the access point and starts the workers.
    pub async fn open(spec: &TreeSpec, dir: &Path) -> Result<TreeEngine> {
        std::fs::create_dir_all(dir).map_err(|err| {
            let context = format!("cannot create {}", dir.display());
            Error::caused(ErrorKind::Failed, context, err)
        })?;
        let mut config = spec.config.clone();
        config.journal = dir.join("journal.db");
        let controls = Arc::new(Controls::new(config.rate, 1, config.priority));
        let engine = blocking(move || TreeMigration::start(&config, controls)).await?;
        Ok(TreeEngine {
            engine: Arc::new(engine),
            verify: spec.verify,
            phase: Mutex::new(TreePhase::Migrating),
            verified_files: Mutex::new(0),
            mismatches: Mutex::new(Vec::new()),
            logged_errors: Mutex::new(HashSet::new()),
        })
    }

    fn report(&self) -> TreeReport {
        TreeReport {
            kind: Kind::Tree,
            phase: *self.phase.lock(),
            paused: self.controls().is_paused(),
            progress: self.engine.progress(),
            verified_files: *self.verified_files.lock(),
            mismatches: self.mismatches.lock().clone(),
        }
    }

    /// Compares checksums; `Err` names the files that differ.
    async fn verify(&self) -> Result<()> {
        let engine = self.engine.clone();
        let (files, mismatches) = tokio::task::spawn_blocking(move || engine.verify())
            .await
            .unwrap_or_default();
        *self.verified_files.lock() = files;
        let found: Vec<String> = mismatches
            .iter()
            .map(|m| format!("{} ({})", m.target.display(), m.reason))
            .collect();
        *self.mismatches.lock() = found.clone();
        if found.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = found.iter().take(8).cloned().collect();
        Err(Error::new(
            ErrorKind::Failed,
            format!(
                "verification found {} files that differ from the source: {}",
                found.len(),
                shown.join(", ")
            ),
        ))
    }
}

/// The catalog state a tree's progress corresponds to: its access point
/// shows the target from the start; once everything is migrated and
/// verified it is ready to commit, which the catalog calls switched-over
/// for every kind.
fn state_of(report: &TreeReport) -> State {
    match report.phase {
        TreePhase::Migrating if report.paused => State::Paused,
        TreePhase::Migrating => State::Running,
        TreePhase::Verifying => State::Verifying,
        TreePhase::Verified => State::SwitchedOver,
    }
}

#[async_trait]
impl Engine for TreeEngine {
    fn controls(&self) -> &Controls {
        self.engine.controls()
    }

    /// Waits until every entry is migrated, then compares checksums.
    async fn run(&self) -> Result<Ran> {
        while !self.engine.is_complete() {
            if self.controls().stop_requested() {
                return Ok(Ran::Stopped);
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
        *self.phase.lock() = TreePhase::Verifying;
        if self.verify
            && let Err(err) = self.verify().await
        {
            *self.phase.lock() = TreePhase::Migrating;
            return Err(err);
        }
        *self.phase.lock() = TreePhase::Verified;
        Ok(Ran::Done(
            "every entry is migrated and verified; ready to commit",
        ))
    }

    async fn snapshot(&self) -> Snapshot {
        let report = self.report();
        Snapshot {
            state: state_of(&report),
            report: Report::Tree(Box::new(report)),
        }
    }

    fn take_news(&self) -> Vec<String> {
        let errors = self.engine.progress().errors;
        let mut logged = self.logged_errors.lock();
        errors
            .into_iter()
            .filter(|e| logged.insert((e.path.clone(), e.attempts)))
            .map(|e| {
                format!(
                    "cannot migrate {}: {} (attempt {}; retried with backoff)",
                    e.path, e.message, e.attempts
                )
            })
            .collect()
    }

    fn apply(&self, spec: &Spec) {
        let live = spec.live();
        self.controls().set_rate(live.rate);
        self.controls().set_priority(live.priority);
    }

    async fn switchover(&self) -> Result<()> {
        Err(Error::new(
            ErrorKind::Conflict,
            "it is a tree migration: its access point shows the target from the start, \
             so there is no switchover; commit it once it is done",
        ))
    }

    async fn rollback(&self) -> Result<()> {
        Err(Error::new(
            ErrorKind::Conflict,
            "it is a tree migration, which does not roll back: its source was never written \
             (changes made through the access point exist only in the target); halt it to go \
             back to the source",
        ))
    }

    async fn destination_only(&self) -> Result<u64> {
        Ok(0)
    }

    /// Refused while anything is pending; otherwise unmounts for good and
    /// leaves the target a plain directory tree, synced.
    async fn commit(&self) -> Result<&'static str> {
        let engine = self.engine.clone();
        blocking(move || engine.commit())
            .await
            .map_err(|err| Error {
                kind: ErrorKind::Conflict,
                ..err
            })?;
        Ok("committed: the access point is unmounted; the target is a plain tree")
    }

    /// Stops the workers and unmounts; the journal keeps the position.
    async fn close(&self) -> Result<()> {
        let engine = self.engine.clone();
        blocking(move || engine.stop()).await
    }
}

/// Runs engine work that blocks (mounts, joins, syncs) off the event loop.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> dmm_tree::Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done.map_err(failed),
        Err(err) => Err(Error::caused(
            ErrorKind::Failed,
            "the tree engine's thread failed",
            err,
        )),
    }
}
