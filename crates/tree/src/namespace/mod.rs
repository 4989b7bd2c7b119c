//! What is still missing from the target, and where each missing thing is.
//!
//! The [`Namespace`] holds, in memory, every entry the migration tracks
//! (directories, regular files), the names under which the target shows
//! them, which directories are populated and which file segments are
//! copied, plus the queues the background workers take work from. Every
//! change is written to the [`Journal`] in the order `DESIGN.md`
//! prescribes: population and namespace changes before they are visible,
//! segment marks in batches (or at once, before a client write depends on
//! them).
//!
//! The submodules do the three kinds of work: `populate` (directories),
//! `data` (file segments), `changes` (namespace changes made through the
//! access point, and their recovery after a crash). They read and change
//! the in-memory picture only through `state`'s methods, which keep the
//! progress counters right; `progress` is one file's segment map.

mod changes;
mod data;
mod populate;
mod progress;
mod state;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dmm_control::ValueError;
use parking_lot::Condvar;

pub use self::state::{Blocked, Counts};
use self::state::{Entry, State};
use crate::error::{Error, ErrorKind, Result};
use crate::journal::{Change, Durability, EntryId, EntryState, ErrorRow, Journal, ROOT};
use crate::lock::{self, Mutex, MutexGuard, Rank};
use crate::source::Source;

/// How long a thread waiting for another one (a population, a segment
/// copy) sleeps before it looks again: notifications wake it sooner, and
/// it gives up when the migration is closing.
const WAIT_SLICE: Duration = Duration::from_millis(200);

/// What to do when a source entry meets a target entry of the same name
/// that is not a directory on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collision {
    /// The target must be empty; a collision is an error.
    Error,
    /// The source's entry replaces the target's.
    Overwrite,
    /// The target's entry is moved aside to `NAME.dmm-<migid>`.
    Rename,
}

impl std::str::FromStr for Collision {
    type Err = ValueError;

    fn from_str(text: &str) -> std::result::Result<Collision, ValueError> {
        match text.to_ascii_lowercase().as_str() {
            "error" => Ok(Collision::Error),
            "overwrite" => Ok(Collision::Overwrite),
            "rename" => Ok(Collision::Rename),
            _ => Err(ValueError::new(
                "a collision policy",
                text,
                "choose error, overwrite or rename",
            )),
        }
    }
}

/// How a migration's namespace is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    pub migid: i64,
    pub segsize: u64,
    pub collision: Collision,
}

/// The tracked namespace of one tree migration.
///
/// Locks, in the order a thread may take them (`crate::lock`): `linking`,
/// `flushing`, the journal's, `state`. None is held across source I/O, and
/// `state` is never held across a journal call or a wait on another thread
/// other than through `progress`.
pub struct Namespace {
    source: Source,
    target: PathBuf,
    /// The target's root, open for `syncfs` before each journal write.
    target_root: std::fs::File,
    settings: Settings,
    journal: Journal,
    state: Mutex<State>,
    /// Signalled when a population or a segment copy ends, and on close.
    progress: Condvar,
    /// Serialises journal flushes so batches land in order.
    flushing: Mutex<()>,
    /// Serialises recording populations that hold hard-linked files, so
    /// two names of one source inode never become two target files.
    linking: Mutex<()>,
    /// Set by [`Namespace::close`]: long steps stop early and waits end.
    closing: AtomicBool,
}

impl Namespace {
    /// Loads the namespace from `journal`, recording the root first if the
    /// journal is new, and resolves namespace changes a crash interrupted.
    pub fn open(
        source: Source,
        target: &Path,
        journal: Journal,
        settings: Settings,
    ) -> Result<Namespace> {
        let snapshot = {
            let _journal = lock::enter(Rank::Journal);
            journal.load()?
        };
        let (state, intents) = State::load(settings.segsize, snapshot);
        let target_root = std::fs::File::open(target).map_err(crate::error::on(
            ErrorKind::Target,
            "open",
            target,
        ))?;
        let namespace = Namespace {
            source,
            target: target.to_path_buf(),
            target_root,
            settings,
            journal,
            state: Mutex::new(Rank::State, state),
            progress: Condvar::new(),
            flushing: Mutex::new(Rank::Flushing, ()),
            linking: Mutex::new(Rank::Linking, ()),
            closing: AtomicBool::new(false),
        };
        if namespace.lock().entry(ROOT).is_none() {
            namespace.record_root()?;
        }
        namespace.recover(intents)?;
        namespace.lock().queue_all();
        Ok(namespace)
    }

    fn record_root(&self) -> Result<()> {
        let meta = std::fs::symlink_metadata(&self.target).map_err(crate::error::on(
            ErrorKind::Target,
            "stat",
            &self.target,
        ))?;
        let root = Entry {
            state: EntryState::Unpopulated,
            source: Some(PathBuf::new()),
            size: 0,
            source_ino: 0,
            source_ctime: 0,
            target_ino: std::os::unix::fs::MetadataExt::ino(&meta),
            changed: false,
            merged: true,
            names: Vec::new(),
            progress: None,
        };
        self.apply(&[Change::Insert(root.row(ROOT))], Durability::Lazy)?;
        self.lock().insert_entry(ROOT, root);
        Ok(())
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn target_root(&self) -> &Path {
        &self.target
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Ends the waits of threads waiting for other threads and makes long
    /// steps (populations, fetches of many segments) stop early: the
    /// migration is being stopped. Their work is redone on the next start.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let _state = self.lock();
        self.progress.notify_all();
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Fails once the migration is closing (see [`Namespace::close`]).
    fn check_open(&self) -> Result<()> {
        if self.is_closing() {
            let shutdown = rustix::io::Errno::SHUTDOWN.raw_os_error();
            return Err(Error::new(ErrorKind::Access, "the migration is stopping")
                .with_source(std::io::Error::from_raw_os_error(shutdown)));
        }
        Ok(())
    }

    /// Waits (bounded, see [`WAIT_SLICE`]) for a population or a segment
    /// copy of another thread to make progress; fails when closing.
    fn wait(&self, state: &mut MutexGuard<'_, State>) -> Result<()> {
        self.check_open()?;
        state.wait_for(&self.progress, WAIT_SLICE);
        self.check_open()
    }

    /// The entry the target object with inode `ino` is, if tracked.
    pub fn entry_of_ino(&self, ino: u64) -> Option<EntryId> {
        self.lock().entry_of_ino(ino)
    }

    /// The tracked entry at `name` in directory `parent`.
    pub fn child(&self, parent: EntryId, name: &OsStr) -> Option<EntryId> {
        self.lock().child(parent, name)
    }

    /// Whether the entry came from the source and no client changed it.
    pub fn is_unchanged(&self, id: EntryId) -> bool {
        self.lock()
            .entry(id)
            .is_some_and(|e| !e.changed && e.source.is_some())
    }

    /// The source's metadata of an entry dmm is still filling in and no
    /// client changed: a directory not populated yet, a file with data
    /// still to copy. Their placeholders' times (and a directory's link
    /// count) move while dmm works on them, so clients are shown the
    /// source's, which they end with.
    pub fn settling_source_meta(&self, id: EntryId) -> Option<crate::source::Meta> {
        let source = {
            let state = self.lock();
            let entry = state.entry(id)?;
            let settling = match entry.state {
                EntryState::Unpopulated => true,
                EntryState::Pending => !entry.changed,
                EntryState::Populated | EntryState::Done => false,
            };
            settling.then(|| entry.source.clone()).flatten()?
        };
        self.source.stat(&source).ok()
    }

    /// How many entries dmm finished filling in so far. Read it before a
    /// look at the target: if it has not moved when the look is judged,
    /// every settled entry was settled before the look.
    pub fn settled_count(&self) -> u64 {
        self.lock().settled_count()
    }

    /// Whether dmm is done filling the entry in (a directory populated, a
    /// file with all its data): from then on only clients change it.
    pub fn is_settled(&self, id: EntryId) -> bool {
        self.lock()
            .entry(id)
            .is_some_and(|e| matches!(e.state, EntryState::Populated | EntryState::Done))
    }

    /// Whether the entry is a regular file with data still to copy.
    pub fn is_pending_file(&self, id: EntryId) -> bool {
        self.lock().entry(id).is_some_and(|e| e.progress.is_some())
    }

    /// The target path of a tracked entry now, or `None` once it has no
    /// name left.
    pub fn target_path(&self, id: EntryId) -> Option<PathBuf> {
        let relative = self.lock().path_of(id)?;
        Some(self.target.join(relative))
    }

    /// The target inode number of a tracked entry.
    fn target_ino(&self, id: EntryId) -> Option<u64> {
        self.lock().entry(id).map(|e| e.target_ino)
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts()
    }

    /// Errors recorded against entries, oldest first.
    pub fn errors(&self) -> Vec<ErrorRow> {
        self.lock().errors()
    }

    /// Whether nothing is left to do: every directory populated, every file
    /// copied, no entry in error. (Intents are resolved at open and
    /// finished before the operation that started them returns.)
    pub fn is_complete(&self) -> bool {
        self.lock().is_complete()
    }

    /// The next directory to populate: urgent first, entries in error
    /// when their retry is due.
    pub fn next_dir(&self) -> Option<EntryId> {
        self.lock().next_dir()
    }

    /// The next file to copy: urgent first.
    pub fn next_file(&self) -> Option<EntryId> {
        self.lock().next_file()
    }

    /// Puts a file a worker gave up on (pause, stop) back in the queue.
    pub fn requeue(&self, id: EntryId) {
        self.lock().requeue_file(id);
    }

    /// Puts an entry at the front of the workers' queues (a client waits
    /// on it).
    pub fn prioritise(&self, id: EntryId) {
        self.lock().prioritise(id);
    }

    /// Records that a background step on `id` failed; it is retried with
    /// backoff, and the rest of the migration goes on. An entry that is
    /// gone meanwhile (a client deleted it) has nothing left to retry. A
    /// target file system that is full or read-only blocks the whole
    /// migration instead ([`Namespace::blocked`]): retrying cannot mend it.
    pub fn record_failure(&self, id: EntryId, err: &Error) {
        let mut state = self.lock();
        state.record_failure(id, err.report());
        if let Some(blocked) = blocks_the_target(err) {
            state.block(blocked);
        }
    }

    /// Why the target takes no more writes (its file system is full or
    /// read-only), until [`Namespace::retry_now`].
    pub fn blocked(&self) -> Option<Blocked> {
        self.lock().blocked()
    }

    /// Lifts a block and retries every entry in error at once (an admin
    /// freed space, or started the migration again).
    pub fn retry_now(&self) {
        self.lock().retry_now();
    }

    /// Retries the entry in error at `path` now (the dashboard's retry
    /// button); whether there is one.
    pub fn retry_path(&self, path: &str) -> bool {
        self.lock().retry_path(path)
    }

    /// Writes the batched changes and marks to the journal, once what they
    /// describe is on the target's disk (see [`Namespace::apply`]).
    pub fn flush(&self) -> Result<()> {
        self.flush_with(Durability::Lazy)
    }

    /// [`Namespace::flush`], and the journal durable on return: what a
    /// client's fsync and a namespace change's intent need.
    pub fn flush_durably(&self) -> Result<()> {
        self.flush_with(Durability::Durable)
    }

    /// A batch the journal refused goes back in front of what was batched
    /// since, for the next flush; a journal (or target) that is full or
    /// read-only blocks the migration until [`Namespace::retry_now`].
    fn flush_with(&self, durability: Durability) -> Result<()> {
        let _order = self.flushing.lock();
        let batch = self.lock().take_batch();
        let applied = self.apply(&batch, durability);
        if let Err(err) = &applied {
            let mut state = self.lock();
            state.put_back(batch);
            if let Some(blocked) = blocks_the_target(err) {
                state.block(blocked);
            }
        }
        applied
    }

    /// Commits `changes` at once, after whatever was batched before them.
    fn commit(&self, changes: Vec<Change>, durability: Durability) -> Result<()> {
        self.lock().journal(changes);
        self.flush_with(durability)
    }

    /// One call into the journal. The target's file system is synced
    /// first: every change recorded was made in the target before it was
    /// recorded, so the journal can never be ahead of the target's disk,
    /// whenever SQLite or the kernel write its pages back. A power cut
    /// then leaves the journal describing the target as it was at some
    /// earlier instant, never an entry marked done whose data or name the
    /// disk lost.
    fn apply(&self, changes: &[Change], durability: Durability) -> Result<()> {
        if !changes.is_empty() {
            self.sync_target()?;
        }
        let _journal = lock::enter(Rank::Journal);
        self.journal.apply(changes, durability)
    }

    /// Makes everything written to the target's file system durable.
    fn sync_target(&self) -> Result<()> {
        rustix::fs::syncfs(&self.target_root)
            .map_err(|e| crate::error::on(ErrorKind::Target, "sync", &self.target)(e.into()))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }
}

impl Namespace {
    /// Every regular file copied from the source and not changed through
    /// the access point: its entry, source path and target inode.
    pub fn unchanged_files(&self) -> Vec<UnchangedFile> {
        let state = self.lock();
        let mut files: Vec<UnchangedFile> = state
            .entries()
            .filter(|(_, e)| e.state == EntryState::Done && !e.changed)
            .filter_map(|(id, e)| {
                Some(UnchangedFile {
                    id,
                    source: e.source.clone()?,
                    target_ino: e.target_ino,
                })
            })
            .collect();
        files.sort_by(|a, b| a.source.cmp(&b.source));
        files
    }
}

/// A file verification compares (see [`Namespace::unchanged_files`]).
#[derive(Debug, Clone)]
pub struct UnchangedFile {
    pub id: EntryId,
    pub source: PathBuf,
    pub target_ino: u64,
}

/// Whether an error says the target file system takes no more writes: out
/// of space or inodes, over quota, or read-only.
fn blocks_the_target(err: &Error) -> Option<Blocked> {
    let errno = err.errno();
    matches!(errno, libc::ENOSPC | libc::EDQUOT | libc::EROFS).then(|| Blocked {
        path: err.path().map(Path::to_path_buf).unwrap_or_default(),
        errno,
    })
}
