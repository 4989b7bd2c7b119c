//! A tree migration run to its end the way a supervisor drives every
//! migration: opened (access point mounted, resuming from the journal),
//! watched until everything is migrated, verified, reported on, closed
//! (resumable) or committed (the target a plain tree).
//!
//! Every call blocks (mounts, joins, hashing); a caller on an event loop
//! runs them on a thread of its own. The job's own locks are leaves, outside
//! the engine's lock order: each is held alone, to read or replace one
//! value, never while the engine is called.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dmm_control::Controls;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::migration::{TreeConfig, TreeMigration, TreeProgress};

/// How often [`TreeJob::run`] looks at the engine.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Where a tree migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TreePhase {
    /// Entries still to migrate (background workers and on demand).
    Migrating,
    /// Everything is migrated; checksums being compared.
    Verifying,
    /// Everything is migrated and verified: ready to commit.
    Verified,
}

/// The one value of [`TreeReport::kind`], which tells a tree's report
/// from another kind's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TreeKind {
    Tree,
}

/// What `dmm stat` shows for a tree migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TreeReport {
    pub kind: TreeKind,
    pub phase: TreePhase,
    pub paused: bool,
    #[serde(flatten)]
    pub progress: TreeProgress,
    /// Files whose checksums were compared, once verified.
    pub verified_files: u64,
    /// Files whose target copy differs from the source.
    pub mismatches: Vec<String>,
}

/// How a run ended without failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Everything is migrated and verified: ready to commit.
    Verified,
    /// Stopped on request; the journal resumes it.
    Stopped,
}

/// A tree migration under a supervisor.
pub struct TreeJob {
    engine: TreeMigration,
    verify: bool,
    phase: Mutex<TreePhase>,
    verified_files: Mutex<u64>,
    mismatches: Mutex<Vec<String>>,
    /// Per-file errors already reported by [`TreeJob::take_news`].
    reported: Mutex<HashSet<(String, u32)>>,
}

impl TreeJob {
    /// Opens the journal (finishing what a crash interrupted), mounts the
    /// access point and starts the workers; `verify` compares checksums
    /// before the migration is ready to commit.
    pub fn open(config: &TreeConfig, verify: bool) -> Result<TreeJob> {
        let controls = Arc::new(Controls::new(config.rate, 1, config.priority));
        Ok(TreeJob {
            engine: TreeMigration::start(config, controls)?,
            verify,
            phase: Mutex::new(TreePhase::Migrating),
            verified_files: Mutex::new(0),
            mismatches: Mutex::new(Vec::new()),
            reported: Mutex::new(HashSet::new()),
        })
    }

    pub fn controls(&self) -> &Controls {
        self.engine.controls()
    }

    /// Waits until every entry is migrated (or a stop is requested), then
    /// compares checksums. A target that takes no more writes (full,
    /// read-only) pauses the copy and ends the run with an error naming
    /// the path; the next run (`dmm start`) retries everything at once.
    pub fn run(&self) -> Result<Finished> {
        self.engine.retry_now();
        while !self.engine.is_complete() {
            if self.controls().stop_requested() {
                return Ok(Finished::Stopped);
            }
            if let Some(why) = self.engine.blocked() {
                self.controls().pause();
                return Err(Error::new(
                    ErrorKind::Target,
                    format!("{why}; the copy is paused: make room, then start it again"),
                ));
            }
            std::thread::sleep(WATCH_EVERY);
        }
        *self.phase.lock() = TreePhase::Verifying;
        if self.verify
            && let Err(err) = self.verify()
        {
            *self.phase.lock() = TreePhase::Migrating;
            return Err(err);
        }
        *self.phase.lock() = TreePhase::Verified;
        Ok(Finished::Verified)
    }

    /// Compares checksums; the error names the files that differ.
    fn verify(&self) -> Result<()> {
        let (files, mismatches) = self.engine.verify();
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
        let detail = format!(
            "found {} files that differ from the source: {}",
            found.len(),
            shown.join(", ")
        );
        Err(Error::new(ErrorKind::Mismatch, detail))
    }

    pub fn report(&self) -> TreeReport {
        TreeReport {
            kind: TreeKind::Tree,
            phase: *self.phase.lock(),
            paused: self.controls().is_paused(),
            progress: self.engine.progress(),
            verified_files: *self.verified_files.lock(),
            mismatches: self.mismatches.lock().clone(),
        }
    }

    /// Per-file errors (and new attempts at them) not reported yet, as log
    /// lines.
    pub fn take_news(&self, report: &TreeReport) -> Vec<String> {
        let mut reported = self.reported.lock();
        report
            .progress
            .errors
            .iter()
            .filter(|e| reported.insert((e.path.clone(), e.attempts)))
            .map(|e| {
                format!(
                    "cannot migrate {}: {} (attempt {}; retried with backoff)",
                    e.path, e.message, e.attempts
                )
            })
            .collect()
    }

    /// Retries the entry in error at `path` (as the report shows it) now,
    /// without waiting for its backoff; whether there is one.
    pub fn retry(&self, path: &str) -> bool {
        self.engine.retry_path(path)
    }

    /// Stops the workers and unmounts; the journal keeps the position.
    pub fn close(&self) -> Result<()> {
        self.engine.stop()
    }

    /// Refused while anything is pending; otherwise unmounts for good and
    /// leaves the target a plain directory tree, synced.
    pub fn commit(&self) -> Result<()> {
        self.engine.commit()
    }
}
