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
//! access point, and their recovery after a crash).

mod changes;
mod data;
mod populate;

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::journal::{Change, EntryRow, EntryState, ErrorRow, Journal, NameRow, ROOT};
use dmm_control::ValueError;
use parking_lot::Condvar;
use roaring::RoaringBitmap;

pub use crate::journal::EntryId;
pub use changes::Intent;

use crate::error::{Error, ErrorKind, Result};
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

/// Copy progress of a regular file that is not complete.
#[derive(Debug, Default)]
struct FileProgress {
    /// Segments whose bytes are in the target.
    fetched: RoaringBitmap,
    /// Segments being copied right now.
    busy: RoaringBitmap,
    /// Bytes past this offset are not fetched (the client truncated).
    limit: u64,
    /// Every segment below this one was fetched or busy when last looked
    /// at: where the background copy looks for work first.
    cursor: u32,
}

impl FileProgress {
    fn new(limit: u64, fetched: RoaringBitmap) -> FileProgress {
        FileProgress {
            fetched,
            busy: RoaringBitmap::new(),
            limit,
            cursor: 0,
        }
    }

    /// Segments of the file (those past `limit` are not needed).
    fn segments(&self, segsize: u64) -> u32 {
        segments(self.limit, segsize)
    }

    fn is_complete(&self, segsize: u64) -> bool {
        let count = self.segments(segsize);
        self.fetched.range_cardinality(0..count) == u64::from(count)
    }

    /// Bytes of a file of `size` bytes that need no more copying: the
    /// fetched segments, and everything past a client's truncation.
    fn done_bytes(&self, size: u64, segsize: u64) -> u64 {
        let count = self.segments(segsize);
        let mut bytes = self.fetched.range_cardinality(0..count) * segsize;
        if count > 0 && self.fetched.contains(count - 1) {
            // The last segment ends at the limit.
            bytes -= u64::from(count) * segsize - self.limit;
        }
        bytes + size.saturating_sub(self.limit)
    }

    /// The first segment nobody has copied or claimed.
    fn first_free(&mut self, segsize: u64) -> Option<u32> {
        let count = self.segments(segsize);
        while self.cursor < count
            && (self.fetched.contains(self.cursor) || self.busy.contains(self.cursor))
        {
            self.cursor += 1;
        }
        (self.cursor < count).then_some(self.cursor)
    }
}

/// The number of `segsize` segments in `limit` bytes.
fn segments(limit: u64, segsize: u64) -> u32 {
    limit.div_ceil(segsize) as u32
}

/// One tracked entry.
#[derive(Debug)]
struct Entry {
    state: EntryState,
    source: Option<PathBuf>,
    size: u64,
    source_ino: u64,
    target_ino: u64,
    changed: bool,
    merged: bool,
    /// (parent, name) pairs; a directory has one, a file one per link.
    names: Vec<(EntryId, OsString)>,
    progress: Option<FileProgress>,
}

impl Entry {
    /// What this entry adds to the progress counters.
    fn counts(&self, segsize: u64) -> Counts {
        match self.state {
            EntryState::Unpopulated => Counts {
                dirs_total: 1,
                ..Counts::default()
            },
            EntryState::Populated => Counts {
                dirs_total: 1,
                dirs_done: 1,
                ..Counts::default()
            },
            EntryState::Pending | EntryState::Done => Counts {
                files_total: 1,
                files_done: u64::from(self.progress.is_none()),
                bytes_total: self.size,
                bytes_done: self
                    .progress
                    .as_ref()
                    .map_or(self.size, |p| p.done_bytes(self.size, segsize)),
                ..Counts::default()
            },
        }
    }

    fn row(&self, id: EntryId) -> EntryRow {
        EntryRow {
            id,
            state: self.state,
            source: self
                .source
                .as_ref()
                .map(|p| p.as_os_str().as_bytes().to_vec()),
            size: self.size,
            source_ino: self.source_ino,
            target_ino: self.target_ino,
            changed: self.changed,
            merged: self.merged,
            segments: self.progress.as_ref().map(|p| serialize(&p.fetched)),
        }
    }
}

fn serialize(bitmap: &RoaringBitmap) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(bitmap.serialized_size());
    bitmap.serialize_into(&mut bytes).expect("writing to a Vec");
    bytes
}

/// An entry the background workers could not migrate, and when to retry.
#[derive(Debug, Clone)]
struct Failure {
    row: ErrorRow,
    retry_at: Instant,
}

/// Counters for progress reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub dirs_total: u64,
    pub dirs_done: u64,
    pub files_total: u64,
    pub files_done: u64,
    /// Logical bytes of the files known so far.
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Bytes actually written to the target (holes excluded).
    pub bytes_written: u64,
    pub errors: u64,
}

impl Counts {
    /// Adds (`sign` 1) or takes away (`sign` -1) one entry's counts.
    fn apply(&mut self, other: Counts, sign: i8) {
        let apply = |total: &mut u64, part: u64| {
            *total = if sign > 0 {
                *total + part
            } else {
                total.saturating_sub(part)
            }
        };
        apply(&mut self.dirs_total, other.dirs_total);
        apply(&mut self.dirs_done, other.dirs_done);
        apply(&mut self.files_total, other.files_total);
        apply(&mut self.files_done, other.files_done);
        apply(&mut self.bytes_total, other.bytes_total);
        apply(&mut self.bytes_done, other.bytes_done);
    }
}

struct State {
    segsize: u64,
    entries: HashMap<EntryId, Entry>,
    names: HashMap<(EntryId, OsString), EntryId>,
    by_target_ino: HashMap<u64, EntryId>,
    by_source_ino: HashMap<u64, EntryId>,
    next_id: EntryId,
    next_intent: i64,
    populating: HashSet<EntryId>,
    /// Names merged directories held before their population began
    /// (with the intent recording them).
    premerge: HashMap<EntryId, (i64, HashSet<OsString>)>,
    dirs: VecDeque<EntryId>,
    files: VecDeque<EntryId>,
    urgent_dirs: VecDeque<EntryId>,
    urgent_files: VecDeque<EntryId>,
    failures: HashMap<EntryId, Failure>,
    /// Entries with marks (segments copied, the changed flag) not yet in
    /// the journal. A file's segment bitmap is journaled once per flush,
    /// however many segments were copied since the last one.
    unflushed: HashSet<EntryId>,
    batch: Vec<Change>,
    counts: Counts,
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

/// Retry delays for entries in error: 1 s doubling up to 5 min.
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(8).saturating_sub(1)).min(Duration::from_secs(300))
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
        let mut state = State {
            segsize: settings.segsize,
            entries: HashMap::new(),
            names: HashMap::new(),
            by_target_ino: HashMap::new(),
            by_source_ino: HashMap::new(),
            next_id: ROOT + 1,
            next_intent: 1,
            populating: HashSet::new(),
            premerge: HashMap::new(),
            dirs: VecDeque::new(),
            files: VecDeque::new(),
            urgent_dirs: VecDeque::new(),
            urgent_files: VecDeque::new(),
            failures: HashMap::new(),
            unflushed: HashSet::new(),
            batch: Vec::new(),
            counts: Counts::default(),
        };
        for row in snapshot.entries {
            state.install(row);
        }
        for name in snapshot.names {
            let os = OsString::from_vec(name.name);
            if let Some(entry) = state.entries.get_mut(&name.entry) {
                entry.names.push((name.parent, os.clone()));
                state.names.insert((name.parent, os), name.entry);
            }
        }
        let now = Instant::now();
        for row in snapshot.errors {
            let retry_at = now + backoff(row.attempts);
            state.counts.errors += 1;
            state.failures.insert(row.entry, Failure { row, retry_at });
        }
        state.next_intent = snapshot
            .intents
            .iter()
            .map(|(id, _)| id + 1)
            .max()
            .unwrap_or(1);
        let namespace = Namespace {
            source,
            target: target.to_path_buf(),
            settings,
            journal,
            state: Mutex::new(Rank::State, state),
            progress: Condvar::new(),
            flushing: Mutex::new(Rank::Flushing, ()),
            linking: Mutex::new(Rank::Linking, ()),
            closing: AtomicBool::new(false),
        };
        if !namespace.lock().entries.contains_key(&ROOT) {
            namespace.record_root()?;
        }
        namespace.recover(snapshot.intents)?;
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
            target_ino: std::os::unix::fs::MetadataExt::ino(&meta),
            changed: false,
            merged: true,
            names: Vec::new(),
            progress: None,
        };
        self.apply(&[Change::Insert(root.row(ROOT))])?;
        self.lock().install(root.row(ROOT));
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
        self.lock().by_target_ino.get(&ino).copied()
    }

    /// The tracked entry at `name` in directory `parent`.
    pub fn child(&self, parent: EntryId, name: &OsStr) -> Option<EntryId> {
        self.lock()
            .names
            .get(&(parent, name.to_os_string()))
            .copied()
    }

    /// Whether the entry came from the source and no client changed it.
    pub fn is_unchanged(&self, id: EntryId) -> bool {
        self.lock()
            .entries
            .get(&id)
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
            let entry = state.entries.get(&id)?;
            let settling = match entry.state {
                EntryState::Unpopulated => true,
                EntryState::Pending => !entry.changed,
                EntryState::Populated | EntryState::Done => false,
            };
            settling.then(|| entry.source.clone()).flatten()?
        };
        self.source.stat(&source).ok()
    }

    /// Whether the entry is a regular file with data still to copy.
    pub fn is_pending_file(&self, id: EntryId) -> bool {
        self.lock()
            .entries
            .get(&id)
            .is_some_and(|e| e.progress.is_some())
    }

    /// The target path of a tracked entry now, or `None` once it has no
    /// name left.
    pub fn target_path(&self, id: EntryId) -> Option<PathBuf> {
        let relative = self.lock().path_of(id)?;
        Some(self.target.join(relative))
    }

    /// The target inode number of a tracked entry.
    fn target_ino(&self, id: EntryId) -> Option<u64> {
        self.lock().entries.get(&id).map(|e| e.target_ino)
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts
    }

    /// Errors recorded against entries, oldest first.
    pub fn errors(&self) -> Vec<ErrorRow> {
        let mut rows: Vec<ErrorRow> = self
            .lock()
            .failures
            .values()
            .map(|f| f.row.clone())
            .collect();
        rows.sort_by_key(|r| r.at);
        rows
    }

    /// Whether nothing is left to do: every directory populated, every file
    /// copied, no entry in error. (Intents are resolved at open and
    /// finished before the operation that started them returns.)
    pub fn is_complete(&self) -> bool {
        let state = self.lock();
        let c = state.counts;
        state.failures.is_empty()
            && state.populating.is_empty()
            && c.dirs_done == c.dirs_total
            && c.files_done == c.files_total
    }

    /// The next directory to populate: urgent first, entries in error
    /// when their retry is due.
    pub fn next_dir(&self) -> Option<EntryId> {
        let mut state = self.lock();
        state.requeue_due_failures();
        while let Some(id) = state
            .urgent_dirs
            .pop_front()
            .or_else(|| state.dirs.pop_front())
        {
            if state.needs_population(id) {
                return Some(id);
            }
        }
        None
    }

    /// The next file to copy: urgent first.
    pub fn next_file(&self) -> Option<EntryId> {
        let mut state = self.lock();
        state.requeue_due_failures();
        while let Some(id) = state
            .urgent_files
            .pop_front()
            .or_else(|| state.files.pop_front())
        {
            if state.needs_copy(id) {
                return Some(id);
            }
        }
        None
    }

    /// Puts a file a worker gave up on (pause, stop) back in the queue.
    pub fn requeue(&self, id: EntryId) {
        self.lock().files.push_front(id);
    }

    /// Puts an entry at the front of the workers' queues (a client waits
    /// on it).
    pub fn prioritise(&self, id: EntryId) {
        let mut state = self.lock();
        if state.needs_population(id) {
            state.urgent_dirs.push_back(id);
        } else if state.needs_copy(id) {
            state.urgent_files.push_back(id);
        }
    }

    /// Records that a background step on `id` failed; it is retried with
    /// backoff, and the rest of the migration goes on. An entry that is
    /// gone meanwhile (a client deleted it) has nothing left to retry.
    pub fn record_failure(&self, id: EntryId, err: &Error) {
        let mut state = self.lock();
        let Some(entry) = state
            .entries
            .get(&id)
            .filter(|e| !e.names.is_empty() || id == ROOT)
        else {
            return;
        };
        let path = entry.source.clone().unwrap_or_default();
        let attempts = state.failures.get(&id).map_or(0, |f| f.row.attempts) + 1;
        let row = ErrorRow {
            entry: id,
            path: path.as_os_str().as_bytes().to_vec(),
            message: err.report(),
            attempts,
            at: now_ms(),
        };
        if !state.failures.contains_key(&id) {
            state.counts.errors += 1;
        }
        state.batch.push(Change::RecordError(row.clone()));
        let retry_at = Instant::now() + backoff(attempts);
        state.failures.insert(id, Failure { row, retry_at });
    }

    /// Writes the batched changes and marks to the journal.
    pub fn flush(&self) -> Result<()> {
        let _order = self.flushing.lock();
        let batch = self.lock().take_batch();
        self.apply(&batch)
    }

    /// Commits `changes` at once, after whatever was batched before them.
    fn commit(&self, changes: Vec<Change>) -> Result<()> {
        self.lock().batch.extend(changes);
        self.flush()
    }

    /// One call into the journal.
    fn apply(&self, changes: &[Change]) -> Result<()> {
        let _journal = lock::enter(Rank::Journal);
        self.journal.apply(changes)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }
}

impl State {
    /// Loads an entry from its journal row.
    fn install(&mut self, row: EntryRow) {
        let progress = (row.state == EntryState::Pending).then(|| {
            let fetched = row
                .segments
                .as_deref()
                .and_then(|b| RoaringBitmap::deserialize_from(b).ok())
                .unwrap_or_default();
            FileProgress::new(row.size, fetched)
        });
        let entry = Entry {
            state: row.state,
            source: row.source.map(|b| PathBuf::from(OsString::from_vec(b))),
            size: row.size,
            source_ino: row.source_ino,
            target_ino: row.target_ino,
            changed: row.changed,
            merged: row.merged,
            names: Vec::new(),
            progress,
        };
        self.next_id = self.next_id.max(row.id + 1);
        self.insert_entry(row.id, entry);
    }

    /// Takes an entry into the maps and the counters.
    fn insert_entry(&mut self, id: EntryId, entry: Entry) {
        self.counts.apply(entry.counts(self.segsize), 1);
        if entry.source_ino != 0 && matches!(entry.state, EntryState::Pending | EntryState::Done) {
            self.by_source_ino.entry(entry.source_ino).or_insert(id);
        }
        self.by_target_ino.insert(entry.target_ino, id);
        self.entries.insert(id, entry);
    }

    /// Changes entry `id` through `change`, keeping the counters right.
    fn update_entry<R>(&mut self, id: EntryId, change: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        let segsize = self.segsize;
        let entry = self.entries.get_mut(&id)?;
        self.counts.apply(entry.counts(segsize), -1);
        let result = change(entry);
        self.counts.apply(entry.counts(segsize), 1);
        Some(result)
    }

    /// Changes the copy progress of file `id` (if it has data still to
    /// copy), keeping the counters right.
    fn update_progress<R>(
        &mut self,
        id: EntryId,
        change: impl FnOnce(&mut FileProgress) -> R,
    ) -> Option<R> {
        self.update_entry(id, |entry| entry.progress.as_mut().map(change))
            .flatten()
    }

    fn queue_all(&mut self) {
        let mut ids: Vec<EntryId> = self.entries.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if self.needs_population(id) {
                self.dirs.push_back(id);
            } else if self.needs_copy(id) {
                self.files.push_back(id);
            }
        }
    }

    fn requeue_due_failures(&mut self) {
        let now = Instant::now();
        let due: Vec<EntryId> = self
            .failures
            .iter()
            .filter(|(_, f)| f.retry_at <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            if let Some(failure) = self.failures.get_mut(&id) {
                // Not retried again until this attempt reports.
                failure.retry_at = now + Duration::from_secs(3600);
            }
            if self.needs_population(id) {
                self.dirs.push_back(id);
            } else if self.needs_copy(id) {
                self.files.push_back(id);
            }
        }
    }

    /// The changes to journal next: the batch, then the segment bitmap of
    /// every file whose marks changed (a file completed or deleted since
    /// has its final row in the batch instead).
    fn take_batch(&mut self) -> Vec<Change> {
        let mut batch = std::mem::take(&mut self.batch);
        for id in self.unflushed.drain() {
            let progress = self.entries.get(&id).and_then(|e| e.progress.as_ref());
            if let Some(progress) = progress {
                batch.push(Change::Segments(id, serialize(&progress.fetched)));
            }
        }
        batch
    }

    fn clear_failure(&mut self, id: EntryId) {
        if self.failures.remove(&id).is_some() {
            self.counts.errors -= 1;
            self.batch.push(Change::ClearError(id));
        }
    }

    fn needs_population(&self, id: EntryId) -> bool {
        self.entries.get(&id).is_some_and(|e| {
            e.state == EntryState::Unpopulated && (id == ROOT || !e.names.is_empty())
        }) && !self.populating.contains(&id)
    }

    fn needs_copy(&self, id: EntryId) -> bool {
        self.entries
            .get(&id)
            .is_some_and(|e| e.progress.is_some() && !e.names.is_empty())
    }

    /// The entry's path relative to the target root.
    fn path_of(&self, id: EntryId) -> Option<PathBuf> {
        let mut parts = Vec::new();
        let mut at = id;
        while at != ROOT {
            let (parent, name) = self.entries.get(&at)?.names.first()?;
            parts.push(name.clone());
            at = *parent;
            if parts.len() > 4096 {
                return None;
            }
        }
        Some(parts.iter().rev().collect())
    }

    fn allocate(&mut self) -> EntryId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn add_name(&mut self, id: EntryId, parent: EntryId, name: OsString) -> Change {
        self.names.insert((parent, name.clone()), id);
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.names.push((parent, name.clone()));
        }
        Change::AddName(NameRow {
            parent,
            name: name.into_vec(),
            entry: id,
        })
    }

    fn remove_name(&mut self, parent: EntryId, name: &OsStr) -> Option<Change> {
        let id = self.names.remove(&(parent, name.to_os_string()))?;
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.names.retain(|(p, n)| !(*p == parent && n == name));
        }
        Some(Change::RemoveName {
            parent,
            name: name.as_bytes().to_vec(),
        })
    }

    /// Forgets an entry that has no name left in the target.
    fn forget(&mut self, id: EntryId) -> Change {
        if let Some(entry) = self.entries.remove(&id) {
            self.counts.apply(entry.counts(self.segsize), -1);
            self.by_target_ino.remove(&entry.target_ino);
            if self.by_source_ino.get(&entry.source_ino) == Some(&id) {
                self.by_source_ino.remove(&entry.source_ino);
            }
        }
        if self.failures.remove(&id).is_some() {
            self.counts.errors -= 1;
        }
        Change::Delete(id)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Namespace {
    /// Every regular file copied from the source and not changed through
    /// the access point: its entry, source path and target inode.
    pub fn unchanged_files(&self) -> Vec<UnchangedFile> {
        let state = self.lock();
        let mut files: Vec<UnchangedFile> = state
            .entries
            .iter()
            .filter(|(_, e)| e.state == EntryState::Done && !e.changed)
            .filter_map(|(&id, e)| {
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
