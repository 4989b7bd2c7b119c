//! A tree migration as the daemon drives it: checked, started (access point
//! mounted, workers running), watched, stopped, verified, committed.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use dmm_control::{Controls, Priority};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::access::{self, AccessPoint, AccessUsers};
use crate::error::{Error, ErrorKind, Result, on};
use crate::journal::{ErrorRow, Journal};
use crate::namespace::{Collision, Counts, Namespace, Settings};
use crate::source::Source;
use crate::verify::{self, Mismatch};
use crate::worker::Workers;

/// Everything a tree migration is made of.
#[derive(Debug, Clone)]
pub struct TreeConfig {
    pub migid: i64,
    pub source: PathBuf,
    pub target: PathBuf,
    pub access: PathBuf,
    /// The journal file (in the migration's state directory).
    pub journal: PathBuf,
    pub segsize: u64,
    pub collision: Collision,
    /// Who may use the access point.
    pub access_users: AccessUsers,
    pub rate: Option<u64>,
    pub priority: Priority,
    /// Directory workers (`maxnsproc`).
    pub dir_workers: usize,
    /// File workers (`maxdfproc`).
    pub file_workers: usize,
}

/// A progress report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TreeProgress {
    #[serde(flatten)]
    pub counts: Counts,
    /// Bytes per second since the start of this run.
    pub rate: u64,
    pub eta_seconds: Option<u64>,
    pub complete: bool,
    pub errors: Vec<ErrorReport>,
    /// Opens of files the kernel passed through to the target (served at
    /// the target's speed, without dmm).
    #[serde(default)]
    pub passthrough_opens: u64,
}

/// One entry in error, for `dmm stat` and `dmm log`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReport {
    pub path: String,
    pub message: String,
    pub attempts: u32,
}

impl From<ErrorRow> for ErrorReport {
    fn from(row: ErrorRow) -> ErrorReport {
        ErrorReport {
            path: String::from_utf8_lossy(&row.path).into_owned(),
            message: row.message,
            attempts: row.attempts,
        }
    }
}

/// Checks a configuration before the migration is created: the source is a
/// readable directory, the target a directory (empty with
/// `collision=error`) that is not inside the source or the other way
/// round, the access point an empty directory with nothing mounted.
pub fn check(config: &TreeConfig, fresh: bool) -> Result<()> {
    Source::open(&config.source)?;
    let target = fs::metadata(&config.target).map_err(on(
        ErrorKind::Invalid,
        "use the target",
        &config.target,
    ))?;
    if !target.is_dir() {
        return Err(
            Error::on(ErrorKind::Invalid, "use the target", &config.target)
                .with_detail("not a directory"),
        );
    }
    let source =
        config
            .source
            .canonicalize()
            .map_err(on(ErrorKind::Invalid, "resolve", &config.source))?;
    let target_path =
        config
            .target
            .canonicalize()
            .map_err(on(ErrorKind::Invalid, "resolve", &config.target))?;
    if source.starts_with(&target_path) || target_path.starts_with(&source) {
        return Err(invalid(format!(
            "the source {} and the target {} overlap",
            source.display(),
            target_path.display()
        )));
    }
    if fresh && config.collision == Collision::Error && !is_empty(&config.target)? {
        return Err(
            Error::on(ErrorKind::Invalid, "use the target", &config.target)
                .with_detail("not empty: set collision=overwrite or collision=rename to merge"),
        );
    }
    if fresh {
        access::check_mountpoint(&config.access)?;
    }
    Ok(())
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::Invalid, message)
}

fn is_empty(dir: &Path) -> Result<bool> {
    let mut entries = fs::read_dir(dir).map_err(on(ErrorKind::Invalid, "list", dir))?;
    Ok(entries.next().is_none())
}

/// A running tree migration. Shared by whoever watches it: stopping and
/// committing take `&self`.
pub struct TreeMigration {
    migid: i64,
    namespace: Arc<Namespace>,
    controls: Arc<Controls>,
    access: Mutex<Option<AccessPoint>>,
    workers: Mutex<Option<Workers>>,
    started: Instant,
    bytes_at_start: u64,
}

impl TreeMigration {
    /// Opens the journal (resolving what a crash interrupted), mounts the
    /// access point and starts the workers.
    pub fn start(config: &TreeConfig, controls: Arc<Controls>) -> Result<TreeMigration> {
        TreeMigration::mount(config, controls).map_err(|err| err.in_migration(config.migid))
    }

    fn mount(config: &TreeConfig, controls: Arc<Controls>) -> Result<TreeMigration> {
        let namespace = Arc::new(open_namespace(config)?);
        access::clear_stale_mount(&config.access)?;
        access::check_mountpoint(&config.access)?;
        let access = AccessPoint::mount(namespace.clone(), &config.access, config.access_users)?;
        let workers = Workers::start(
            namespace.clone(),
            controls.clone(),
            config.dir_workers,
            config.file_workers,
        );
        let bytes_at_start = namespace.counts().bytes_done;
        Ok(TreeMigration {
            migid: config.migid,
            namespace,
            controls,
            access: Mutex::new(Some(access)),
            workers: Mutex::new(Some(workers)),
            started: Instant::now(),
            bytes_at_start,
        })
    }

    pub fn controls(&self) -> &Arc<Controls> {
        &self.controls
    }

    /// Whether every entry is copied and the workers found no source file
    /// changed since its copy.
    pub fn is_complete(&self) -> bool {
        let finished = self.workers.lock().as_ref().is_some_and(Workers::finished);
        finished && self.namespace.is_complete()
    }

    /// Why the target takes no more writes, if it does not (see
    /// [`Namespace::blocked`]).
    pub fn blocked(&self) -> Option<crate::namespace::Blocked> {
        self.namespace.blocked()
    }

    /// Retries every entry in error now and lifts a block.
    pub fn retry_now(&self) {
        self.namespace.retry_now();
    }

    /// Retries the entry in error at `path` now; whether there is one.
    pub fn retry_path(&self, path: &str) -> bool {
        self.namespace.retry_path(path)
    }

    pub fn progress(&self) -> TreeProgress {
        let counts = self.namespace.counts();
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = (counts.bytes_done.saturating_sub(self.bytes_at_start) as f64 / elapsed) as u64;
        let left = counts.bytes_total.saturating_sub(counts.bytes_done);
        TreeProgress {
            counts,
            rate,
            eta_seconds: (rate > 0).then(|| left / rate),
            complete: self.namespace.is_complete(),
            errors: self
                .namespace
                .errors()
                .into_iter()
                .map(ErrorReport::from)
                .collect(),
            passthrough_opens: self
                .access
                .lock()
                .as_ref()
                .map_or(0, AccessPoint::passthrough_opens),
        }
    }

    /// Compares every migrated file not changed through the access point.
    pub fn verify(&self) -> (u64, Vec<Mismatch>) {
        verify::verify(&self.namespace)
    }

    /// Stops the workers and unmounts; the journal keeps the position.
    pub fn stop(&self) -> Result<()> {
        self.shutdown().map_err(|err| err.in_migration(self.migid))
    }

    /// Ends the migration: refused while anything is pending; unmounts the
    /// access point and leaves the target a plain directory tree, flushed.
    pub fn commit(&self) -> Result<()> {
        self.finish().map_err(|err| err.in_migration(self.migid))
    }

    fn finish(&self) -> Result<()> {
        self.namespace.flush()?;
        let outstanding = self.namespace.journal().outstanding()?;
        if !self.namespace.is_complete() || !outstanding.is_complete() {
            return Err(invalid(format!(
                "cannot commit: {} directories and {} files still pending, {} in error",
                outstanding.unpopulated, outstanding.pending, outstanding.errors
            )));
        }
        if let Some(access) = self.access.lock().as_mut() {
            access.unmount_unless_busy()?;
        }
        self.shutdown()?;
        let root = fs::File::open(self.namespace.target_root()).map_err(on(
            ErrorKind::Target,
            "open",
            self.namespace.target_root(),
        ))?;
        rustix::fs::syncfs(&root)
            .map_err(|e| on(ErrorKind::Target, "sync", self.namespace.target_root())(e.into()))?;
        self.namespace.journal().sync()
    }

    /// Stops everything, each wait bounded: no new request or worker step
    /// starts, the access point is unmounted (detached if clients keep it
    /// busy), the steps under way are cut short (population and fetches
    /// are redone on the next start), the threads end, the journal is
    /// flushed.
    fn shutdown(&self) -> Result<()> {
        self.controls.request_stop();
        let mut access = self.access.lock().take();
        let detached = access.as_mut().map_or(Ok(()), AccessPoint::detach);
        self.namespace.close();
        let workers = self.workers.lock().take();
        if let Some(workers) = workers {
            workers.join();
        }
        let joined = access.as_mut().map_or(Ok(()), AccessPoint::join);
        self.namespace.flush()?;
        detached.and(joined)
    }
}

impl Drop for TreeMigration {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            tracing::warn!("{}", err.in_migration(self.migid).report());
        }
    }
}

fn open_namespace(config: &TreeConfig) -> Result<Namespace> {
    let source = Source::open(&config.source)?;
    let journal = Journal::open(&config.journal)?;
    let settings = Settings {
        migid: config.migid,
        segsize: config.segsize,
        collision: config.collision,
    };
    Namespace::open(source, &config.target, journal, settings)
}
