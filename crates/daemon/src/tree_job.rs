//! A tree migration under the supervisor.
//!
//! The tree engine ([`dmm_tree::TreeMigration`]) runs on its own threads
//! once opened: the access point is mounted and the workers copy. This
//! wraps it in the shape the supervisor drives every migration in: open
//! (mount, resuming from the journal), run (watch until everything is
//! migrated, then verify), progress, close (workers stopped, access point
//! unmounted, resumable), commit (unmounted for good, the target a plain
//! tree).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dmm_control::Controls;
use dmm_tree::{TreeConfig, TreeMigration, TreeProgress};
use parking_lot::Mutex;
use serde::Serialize;

/// How often the run loop looks at the engine.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Where a tree migration stands, for the catalog state.
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
    pub kind: &'static str,
    pub phase: TreePhase,
    pub paused: bool,
    #[serde(flatten)]
    pub progress: TreeProgress,
    /// Files whose checksums were compared, once verified.
    pub verified_files: u64,
    /// Files whose target copy differs from the source.
    pub mismatches: Vec<String>,
}

/// Why a tree migration's run ended without being verified.
#[derive(Debug, thiserror::Error)]
pub enum TreeRunError {
    #[error("stopped; start it again to resume")]
    Stopped,
    #[error("verification found {} files that differ from the source: {}", .0.len(), .0.iter().take(8).cloned().collect::<Vec<_>>().join(", "))]
    Mismatch(Vec<String>),
}

/// A tree migration the supervisor has open.
pub struct TreeJob {
    engine: Arc<TreeMigration>,
    verify: bool,
    phase: Mutex<TreePhase>,
    verified_files: Mutex<u64>,
    mismatches: Mutex<Vec<String>>,
    /// Per-file errors already written to the migration's log.
    logged_errors: Mutex<HashSet<(String, u32)>>,
}

impl TreeJob {
    /// Opens the journal (finishing what a crash interrupted), mounts the
    /// access point and starts the workers.
    pub async fn open(
        config: TreeConfig,
        controls: Arc<Controls>,
        verify: bool,
    ) -> dmm_tree::Result<TreeJob> {
        let engine = blocking(move || TreeMigration::start(&config, controls)).await?;
        Ok(TreeJob {
            engine: Arc::new(engine),
            verify,
            phase: Mutex::new(TreePhase::Migrating),
            verified_files: Mutex::new(0),
            mismatches: Mutex::new(Vec::new()),
            logged_errors: Mutex::new(HashSet::new()),
        })
    }

    pub fn controls(&self) -> &Controls {
        self.engine.controls()
    }

    pub fn phase(&self) -> TreePhase {
        *self.phase.lock()
    }

    /// Waits until every entry is migrated, then compares checksums.
    pub async fn run(&self) -> Result<(), TreeRunError> {
        while !self.engine.is_complete() {
            if self.controls().stop_requested() {
                return Err(TreeRunError::Stopped);
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
        *self.phase.lock() = TreePhase::Verifying;
        if self.verify {
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
            if !found.is_empty() {
                *self.phase.lock() = TreePhase::Migrating;
                return Err(TreeRunError::Mismatch(found));
            }
        }
        *self.phase.lock() = TreePhase::Verified;
        Ok(())
    }

    pub fn report(&self) -> TreeReport {
        TreeReport {
            kind: "tree",
            phase: self.phase(),
            paused: self.controls().is_paused(),
            progress: self.engine.progress(),
            verified_files: *self.verified_files.lock(),
            mismatches: self.mismatches.lock().clone(),
        }
    }

    /// Per-file errors (and retries of them) not logged yet, as log lines.
    pub fn new_errors(&self, report: &TreeReport) -> Vec<String> {
        let mut logged = self.logged_errors.lock();
        report
            .progress
            .errors
            .iter()
            .filter(|e| logged.insert((e.path.clone(), e.attempts)))
            .map(|e| {
                format!(
                    "cannot migrate {}: {} (attempt {}; retried with backoff)",
                    e.path, e.message, e.attempts
                )
            })
            .collect()
    }

    /// Stops the workers and unmounts; the journal keeps the position.
    pub async fn close(&self) -> dmm_tree::Result<()> {
        let engine = self.engine.clone();
        blocking(move || engine.stop()).await
    }

    /// Refused while anything is pending; otherwise unmounts for good and
    /// leaves the target a plain directory tree, synced.
    pub async fn commit(&self) -> dmm_tree::Result<()> {
        let engine = self.engine.clone();
        blocking(move || engine.commit()).await
    }
}

/// Runs engine work that blocks (mounts, joins, syncs) off the event loop.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> dmm_tree::Result<T> + Send + 'static,
) -> dmm_tree::Result<T> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        let message = format!("the tree engine's thread failed: {e}");
        Err(dmm_tree::Error::new(dmm_tree::ErrorKind::Access, message))
    })
}
