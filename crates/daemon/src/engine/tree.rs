//! The tree engine ([`dmm_tree::TreeJob`]) behind the [`Engine`]
//! interface: its blocking calls run off the event loop, its phases map to
//! catalog states.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use dmm_catalog::State;
use dmm_control::Controls;
use dmm_tree::{Finished, TreeJob, TreePhase, TreeReport};

use super::{Engine, Ran, Report, Snapshot};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::{Spec, TreeSpec};

/// An open tree migration.
pub struct TreeEngine {
    job: Arc<TreeJob>,
}

/// Checks source, target and access point of a new migration.
pub fn check(spec: &TreeSpec) -> Result<()> {
    dmm_tree::check(&spec.config, true).map_err(|err| Error::new(ErrorKind::Invalid, err.report()))
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
        let verify = spec.verify;
        let job = blocking(move || TreeJob::open(&config, verify)).await?;
        Ok(TreeEngine { job: Arc::new(job) })
    }

    /// Runs a blocking call of the job on a thread of its own.
    async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&TreeJob) -> dmm_tree::Result<T> + Send + 'static,
    ) -> Result<T> {
        let job = self.job.clone();
        blocking(move || work(&job)).await
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
        self.job.controls()
    }

    async fn run(&self) -> Result<Ran> {
        match self.call(TreeJob::run).await? {
            Finished::Verified => Ok(Ran::Done(
                "every entry is migrated and verified; ready to commit",
            )),
            Finished::Stopped => Ok(Ran::Stopped),
        }
    }

    async fn snapshot(&self) -> Snapshot {
        let report = self.job.report();
        Snapshot {
            state: state_of(&report),
            report: Report::Tree(Box::new(report)),
        }
    }

    fn take_news(&self, report: &Report) -> Vec<String> {
        match report {
            Report::Tree(report) => self.job.take_news(report),
            Report::Volume(_) | Report::Stream(_) => Vec::new(),
        }
    }

    fn retry(&self, path: &str) -> Result<()> {
        match self.job.retry(path) {
            true => Ok(()),
            false => Err(Error::new(
                ErrorKind::NotFound,
                format!("no entry in error at {path}"),
            )),
        }
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

    async fn commit(&self) -> Result<&'static str> {
        self.call(TreeJob::commit).await.map_err(|err| Error {
            kind: ErrorKind::Conflict,
            ..err
        })?;
        Ok("committed: the access point is unmounted; the target is a plain tree")
    }

    async fn close(&self) -> Result<()> {
        self.call(TreeJob::close).await
    }
}

/// Runs blocking engine work (mounts, joins, syncs, hashing) off the event
/// loop.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> dmm_tree::Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done.map_err(|err| Error::new(ErrorKind::Failed, err.report())),
        Err(err) => Err(Error::caused(
            ErrorKind::Failed,
            "the tree engine's thread failed",
            err,
        )),
    }
}
