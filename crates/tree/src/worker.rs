//! The background migrator: directory workers populate directories and
//! file workers copy segments, taking work from the namespace's queues
//! (entries clients wait on come first), under the migration's controls:
//! pause, stop, the bandwidth limit and the priority (which sets how many
//! file workers run).
//!
//! Workers are threads: the work is blocking file I/O. A flusher thread
//! writes the batched journal marks every [`FLUSH_EVERY`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use dmm_control::{Controls, RateLimiter};

use crate::journal::EntryId;
use crate::lock::{Mutex, Rank};
use crate::namespace::Namespace;
use crate::threads::join_within;

/// How often batched journal marks are written.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// How long an idle worker sleeps before looking for work again.
const IDLE: Duration = Duration::from_millis(20);

/// How long stopping waits for the workers to finish their step.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// The running workers of one migration.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

struct Shared {
    namespace: Arc<Namespace>,
    controls: Arc<Controls>,
    limiter: Mutex<RateLimiter>,
    /// Workers in the middle of a step.
    busy: AtomicUsize,
    /// Held while one worker decides whether the migration is finished.
    settling: Mutex<()>,
    finished: AtomicBool,
}

impl Workers {
    /// Starts `dirs` directory workers and `files` file workers (scaled by
    /// the priority).
    pub fn start(
        namespace: Arc<Namespace>,
        controls: Arc<Controls>,
        dirs: usize,
        files: usize,
    ) -> Workers {
        let shared = Arc::new(Shared {
            namespace,
            controls,
            limiter: Mutex::new(Rank::Limiter, RateLimiter::default()),
            busy: AtomicUsize::new(0),
            settling: Mutex::new(Rank::Settling, ()),
            finished: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for index in 0..dirs.max(1) {
            let shared = shared.clone();
            threads.push(spawn(format!("dmm-dir-{index}"), move || {
                shared.directory_worker()
            }));
        }
        for index in 0..files.max(1) * 2 {
            let shared = shared.clone();
            threads.push(spawn(format!("dmm-file-{index}"), move || {
                shared.file_worker(index, files.max(1))
            }));
        }
        let flusher = shared.clone();
        threads.push(spawn("dmm-flush".into(), move || flusher.flusher()));
        Workers { threads, shared }
    }

    /// Whether the workers ran out of work for good: everything copied,
    /// and no source file changed since its copy.
    pub fn finished(&self) -> bool {
        self.shared.finished.load(Ordering::Acquire)
    }

    /// Waits for the workers to end (bounded: a worker stuck in a system
    /// call on a source that stopped answering is left behind, logged).
    pub fn join(self) {
        let late = join_within(self.threads, STOP_WITHIN);
        if late > 0 {
            tracing::warn!("{late} migration workers still busy {STOP_WITHIN:?} after the stop");
        }
        let _ = self.shared.namespace.flush();
    }
}

fn spawn(name: String, work: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    thread::Builder::new()
        .name(name)
        .spawn(work)
        .expect("spawning a worker thread")
}

impl Shared {
    /// Whether the worker should end now.
    fn done(&self) -> bool {
        if self.controls.stop_requested() || self.finished.load(Ordering::Acquire) {
            return true;
        }
        if self.busy.load(Ordering::Acquire) == 0 && self.namespace.is_complete() {
            return self.settle();
        }
        false
    }

    /// Everything is copied: one worker looks for source files changed
    /// since their copy, which are copied again; with none, the migration
    /// is finished.
    fn settle(&self) -> bool {
        let _settling = self.settling.lock();
        if self.finished.load(Ordering::Acquire) {
            return true;
        }
        // Another worker may have just restarted copies while this one
        // waited for the lock.
        if !self.namespace.is_complete() {
            return false;
        }
        match self.namespace.recopy_changed_sources() {
            Ok(recopied) if !recopied.is_empty() => {
                for path in recopied {
                    tracing::warn!(
                        "{} changed in the source after dmm copied it: copying it again",
                        path.display()
                    );
                }
                return false;
            }
            Ok(_) => {}
            // Verification compares what is left.
            Err(err) => tracing::error!("{}", err.report()),
        }
        self.finished.store(true, Ordering::Release);
        true
    }

    fn wait_unpaused(&self) {
        while self.controls.is_paused() && !self.controls.stop_requested() {
            thread::sleep(IDLE * 5);
        }
    }

    fn directory_worker(&self) {
        while !self.done() {
            self.wait_unpaused();
            self.busy.fetch_add(1, Ordering::AcqRel);
            let work = self.namespace.next_dir();
            if let Some(id) = work {
                // Failures are recorded and retried by the namespace.
                let _ = self.namespace.ensure_populated(id);
            }
            self.busy.fetch_sub(1, Ordering::AcqRel);
            if work.is_none() {
                thread::sleep(IDLE);
            }
        }
    }

    /// File worker `index` runs while the priority allows that many.
    fn file_worker(&self, index: usize, normal: usize) {
        while !self.done() {
            self.wait_unpaused();
            if index >= self.controls.priority().scale(normal) {
                thread::sleep(IDLE * 5);
                continue;
            }
            self.busy.fetch_add(1, Ordering::AcqRel);
            let work = self.namespace.next_file();
            if let Some(id) = work {
                self.copy_file(id);
            }
            self.busy.fetch_sub(1, Ordering::AcqRel);
            if work.is_none() {
                thread::sleep(IDLE);
            }
        }
    }

    fn copy_file(&self, id: EntryId) {
        loop {
            if self.controls.stop_requested() || self.controls.is_paused() {
                // Back in the queue for later.
                self.namespace.requeue(id);
                return;
            }
            match self.namespace.copy_next_segment(id) {
                Ok(Some(written)) => self.pace(written),
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!("{}", err.report());
                    self.namespace.record_failure(id, &err);
                    return;
                }
            }
        }
    }

    /// Sleeps as long as the rate limit asks, in slices, so that a stop
    /// is not held up by a low rate.
    fn pace(&self, bytes: u64) {
        let wait = self.limiter.lock().spend(bytes, self.controls.rate());
        let until = std::time::Instant::now() + wait;
        while !self.controls.stop_requested() {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            thread::sleep(left.min(IDLE * 5));
        }
    }

    /// Journals the batched marks every [`FLUSH_EVERY`]. While the
    /// migration is blocked (its target or journal full or read-only) the
    /// batch waits in memory: the next run retries it.
    fn flusher(&self) {
        while !self.done() {
            thread::sleep(FLUSH_EVERY);
            if self.namespace.blocked().is_some() {
                continue;
            }
            if let Err(err) = self.namespace.flush() {
                tracing::error!("{}", err.report());
            }
        }
    }
}
