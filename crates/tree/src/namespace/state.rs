//! The namespace's in-memory state, behind its one lock: the tracked
//! entries and their names, the populations and segment claims under way,
//! the workers' queues, the entries in error, the journal changes not
//! written yet, and the progress counters.
//!
//! The counters are the sum of every entry's [`Entry::counts`]. They stay
//! right by construction: the fields are private, an entry joins through
//! [`State::insert_entry`], changes only through methods that take its
//! counts away before the change and add them back after (`update_entry`),
//! and leaves through `forget`. The rest of the namespace reads entries,
//! never writes them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::ops::Range;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::progress::{FileProgress, Segment};
use crate::journal::{Change, EntryId, EntryRow, EntryState, ErrorRow, NameRow, ROOT, Snapshot};

/// One tracked entry. Made by whoever finds it (a population, the access
/// point), then only read: the state changes it.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) state: EntryState,
    pub(super) source: Option<PathBuf>,
    pub(super) size: u64,
    pub(super) source_ino: u64,
    pub(super) target_ino: u64,
    /// See [`EntryRow::source_ctime`].
    pub(super) source_ctime: i64,
    pub(super) changed: bool,
    pub(super) merged: bool,
    /// (parent, name) pairs; a directory has one, a file one per link.
    /// Empty until the state names it ([`State::add_name`]).
    pub(super) names: Vec<(EntryId, OsString)>,
    pub(super) progress: Option<FileProgress>,
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

    /// The entry as the journal records it.
    pub(super) fn row(&self, id: EntryId) -> EntryRow {
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
            source_ctime: self.source_ctime,
            changed: self.changed,
            merged: self.merged,
            segments: self.progress.as_ref().map(FileProgress::serialized),
        }
    }

    /// The entry a journal row records (without its names).
    fn from_row(row: EntryRow) -> Entry {
        let progress = (row.state == EntryState::Pending)
            .then(|| FileProgress::from_journal(row.size, row.segments.as_deref()));
        Entry {
            state: row.state,
            source: row.source.map(|b| PathBuf::from(OsString::from_vec(b))),
            size: row.size,
            source_ino: row.source_ino,
            target_ino: row.target_ino,
            source_ctime: row.source_ctime,
            changed: row.changed,
            merged: row.merged,
            names: Vec::new(),
            progress,
        }
    }
}

/// Counters for progress reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Entries whose last attempt failed (the report lists them as
    /// `errors`).
    #[serde(rename = "entries_in_error")]
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

/// An entry the background workers could not migrate, and when to retry.
#[derive(Debug, Clone)]
struct Failure {
    row: ErrorRow,
    /// `None` while a retry is under way: it was handed to a worker and
    /// its outcome is not known yet.
    retry_at: Option<Instant>,
}

impl Failure {
    /// Waiting for its retry time: not to be handed out before (however
    /// often the entry sits in the queues, e.g. each time a client waits
    /// on it), so that one fault is one attempt, not a burst of them that
    /// pushes the backoff to minutes.
    fn is_waiting(&self) -> bool {
        self.retry_at.is_some()
    }
}

/// The first write the target refused because its file system takes no
/// more (see [`super::Namespace::blocked`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The target path written to.
    pub path: std::path::PathBuf,
    /// What the file system answered (ENOSPC, EDQUOT, EROFS).
    pub errno: i32,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cause = std::io::Error::from_raw_os_error(self.errno);
        write!(f, "cannot write {}: {cause}", self.path.display())
    }
}

/// Retry delays for entries in error: 1 s doubling up to 5 min.
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(8).saturating_sub(1)).min(Duration::from_secs(300))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The namespace's in-memory state (see the module documentation).
pub(super) struct State {
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
    /// How many times dmm finished filling an entry in (see
    /// [`State::settled_count`]).
    settled: u64,
    /// Why the target takes no more writes (full, read-only), if so.
    blocked: Option<Blocked>,
}

/// Loading from the journal.
impl State {
    /// The state of a migration whose journal holds `snapshot`; returns
    /// the intents it holds, for recovery.
    pub(super) fn load(segsize: u64, snapshot: Snapshot) -> (State, Vec<(i64, String)>) {
        let mut state = State {
            segsize,
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
            settled: 0,
            blocked: None,
        };
        for row in snapshot.entries {
            state.next_id = state.next_id.max(row.id + 1);
            state.insert_entry(row.id, Entry::from_row(row));
        }
        for name in snapshot.names {
            if state.entries.contains_key(&name.entry) {
                state.add_name(name.entry, name.parent, OsString::from_vec(name.name));
            }
        }
        let now = Instant::now();
        for row in snapshot.errors {
            let retry_at = Some(now + backoff(row.attempts));
            state.counts.errors += 1;
            state.failures.insert(row.entry, Failure { row, retry_at });
        }
        state.next_intent = snapshot
            .intents
            .iter()
            .map(|(id, _)| id + 1)
            .max()
            .unwrap_or(1);
        (state, snapshot.intents)
    }

    /// Puts every entry with work left in the workers' queues.
    pub(super) fn queue_all(&mut self) {
        let mut ids: Vec<EntryId> = self.entries.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.queue(id);
        }
    }

    fn queue(&mut self, id: EntryId) {
        if self.needs_population(id) {
            self.dirs.push_back(id);
        } else if self.needs_copy(id) {
            self.files.push_back(id);
        }
    }
}

/// Reading.
impl State {
    pub(super) fn entry(&self, id: EntryId) -> Option<&Entry> {
        self.entries.get(&id)
    }

    /// Every tracked entry, in no order.
    pub(super) fn entries(&self) -> impl Iterator<Item = (EntryId, &Entry)> {
        self.entries.iter().map(|(&id, entry)| (id, entry))
    }

    /// The entry the target object with inode `ino` is, if tracked.
    pub(super) fn entry_of_ino(&self, ino: u64) -> Option<EntryId> {
        self.by_target_ino.get(&ino).copied()
    }

    /// The first entry recorded for source inode `ino` (a file with several
    /// names), whatever its device.
    pub(super) fn entry_of_source_ino(&self, ino: u64) -> Option<EntryId> {
        self.by_source_ino.get(&ino).copied()
    }

    /// The tracked entry at `name` in directory `parent`.
    pub(super) fn child(&self, parent: EntryId, name: &OsStr) -> Option<EntryId> {
        self.names.get(&(parent, name.to_os_string())).copied()
    }

    /// The entry's path relative to the target root.
    pub(super) fn path_of(&self, id: EntryId) -> Option<PathBuf> {
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

    pub(super) fn counts(&self) -> Counts {
        self.counts
    }

    /// Errors recorded against entries, oldest first.
    pub(super) fn errors(&self) -> Vec<ErrorRow> {
        let mut rows: Vec<ErrorRow> = self.failures.values().map(|f| f.row.clone()).collect();
        rows.sort_by_key(|r| r.at);
        rows
    }

    /// Every directory populated, every file copied, no entry in error.
    pub(super) fn is_complete(&self) -> bool {
        let c = self.counts;
        self.failures.is_empty()
            && self.populating.is_empty()
            && c.dirs_done == c.dirs_total
            && c.files_done == c.files_total
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
}

/// The workers' queues.
impl State {
    /// The next directory to populate: urgent first, entries in error
    /// when their retry is due.
    pub(super) fn next_dir(&mut self) -> Option<EntryId> {
        self.requeue_due_failures();
        while let Some(id) = self
            .urgent_dirs
            .pop_front()
            .or_else(|| self.dirs.pop_front())
        {
            if self.needs_population(id) && !self.is_waiting(id) {
                return Some(id);
            }
        }
        None
    }

    /// The next file to copy: urgent first.
    pub(super) fn next_file(&mut self) -> Option<EntryId> {
        self.requeue_due_failures();
        while let Some(id) = self
            .urgent_files
            .pop_front()
            .or_else(|| self.files.pop_front())
        {
            if self.needs_copy(id) && !self.is_waiting(id) {
                return Some(id);
            }
        }
        None
    }

    /// Whether entry `id` failed and waits for its retry time.
    fn is_waiting(&self, id: EntryId) -> bool {
        self.failures.get(&id).is_some_and(Failure::is_waiting)
    }

    /// Puts a file a worker gave up on back at the front of the queue.
    pub(super) fn requeue_file(&mut self, id: EntryId) {
        self.files.push_front(id);
    }

    /// Puts an entry at the front of the workers' queues.
    pub(super) fn prioritise(&mut self, id: EntryId) {
        if self.needs_population(id) {
            self.urgent_dirs.push_back(id);
        } else if self.needs_copy(id) {
            self.urgent_files.push_back(id);
        }
    }

    fn requeue_due_failures(&mut self) {
        let now = Instant::now();
        let due: Vec<EntryId> = self
            .failures
            .iter()
            .filter(|(_, f)| f.retry_at.is_some_and(|at| at <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            if let Some(failure) = self.failures.get_mut(&id) {
                // Not retried again until this attempt reports.
                failure.retry_at = None;
            }
            self.queue(id);
        }
    }
}

/// Entries and their names.
impl State {
    pub(super) fn allocate(&mut self) -> EntryId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Takes an entry (with no names yet) into the maps and the counters.
    pub(super) fn insert_entry(&mut self, id: EntryId, entry: Entry) {
        debug_assert!(entry.names.is_empty(), "names are the state's to add");
        self.counts.apply(entry.counts(self.segsize), 1);
        if entry.source_ino != 0 && matches!(entry.state, EntryState::Pending | EntryState::Done) {
            self.by_source_ino.entry(entry.source_ino).or_insert(id);
        }
        self.by_target_ino.insert(entry.target_ino, id);
        self.entries.insert(id, entry);
    }

    /// Takes a newly placed entry into the maps and queues, named `name`
    /// in `parent`.
    pub(super) fn adopt(&mut self, parent: EntryId, name: OsString, id: EntryId, entry: Entry) {
        match entry.state {
            EntryState::Unpopulated => self.dirs.push_back(id),
            EntryState::Pending => self.files.push_back(id),
            EntryState::Done | EntryState::Populated => {}
        }
        self.insert_entry(id, entry);
        self.add_name(id, parent, name);
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

    pub(super) fn add_name(&mut self, id: EntryId, parent: EntryId, name: OsString) -> Change {
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

    pub(super) fn remove_name(&mut self, parent: EntryId, name: &OsStr) -> Option<Change> {
        let id = self.names.remove(&(parent, name.to_os_string()))?;
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.names.retain(|(p, n)| !(*p == parent && n == name));
        }
        Some(Change::RemoveName {
            parent,
            name: name.as_bytes().to_vec(),
        })
    }

    /// Forgets `id` if its last name is gone.
    pub(super) fn forget_if_nameless(&mut self, id: EntryId) -> Option<Change> {
        let nameless = self.entries.get(&id).is_some_and(|e| e.names.is_empty());
        nameless.then(|| self.forget(id))
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

/// Populations.
impl State {
    pub(super) fn is_unpopulated(&self, id: EntryId) -> bool {
        self.entries
            .get(&id)
            .is_some_and(|e| e.state == EntryState::Unpopulated)
    }

    pub(super) fn is_populating(&self, id: EntryId) -> bool {
        self.populating.contains(&id)
    }

    pub(super) fn begin_population(&mut self, id: EntryId) {
        self.populating.insert(id);
    }

    pub(super) fn end_population(&mut self, id: EntryId) {
        self.populating.remove(&id);
    }

    /// The names merged directory `id` held before its population began,
    /// if an intent records them.
    pub(super) fn premerge(&self, id: EntryId) -> Option<&HashSet<OsString>> {
        self.premerge.get(&id).map(|(_, names)| names)
    }

    /// Records the names a merged directory holds before its population,
    /// under intent `intent` (see [`State::next_intent`]).
    pub(super) fn set_premerge(&mut self, id: EntryId, intent: i64, names: HashSet<OsString>) {
        self.premerge.insert(id, (intent, names));
    }

    /// Directory `id` is populated.
    pub(super) fn mark_populated(&mut self, id: EntryId) {
        self.premerge.remove(&id);
        self.update_entry(id, |entry| entry.state = EntryState::Populated);
        self.settled += 1;
    }

    /// Counts every entry dmm finished filling in: a look at the target
    /// taken while this count did not move saw each settled entry as it
    /// ends, not a placeholder's times in the middle of a copy.
    pub(super) fn settled_count(&self) -> u64 {
        self.settled
    }

    /// A new intent's identifier.
    pub(super) fn next_intent(&mut self) -> i64 {
        self.next_intent += 1;
        self.next_intent - 1
    }
}

/// File data.
impl State {
    /// The offset past which file `id` needs nothing from the source, if
    /// it still has data to copy.
    pub(super) fn limit(&self, id: EntryId) -> Option<u64> {
        Some(self.entries.get(&id)?.progress.as_ref()?.limit())
    }

    /// Claims the first segment of file `id` nobody copied or claimed.
    pub(super) fn claim_free_segment(&mut self, id: EntryId) -> Option<u32> {
        let segsize = self.segsize;
        self.update_progress(id, |progress| progress.claim_free(segsize))
            .flatten()
    }

    /// Claims `segment` of file `id` if it is free; a file with nothing
    /// left to copy has it fetched.
    pub(super) fn claim_segment(&mut self, id: EntryId, segment: u32) -> Segment {
        self.update_progress(id, |progress| progress.claim(segment))
            .unwrap_or(Segment::Fetched)
    }

    /// Ends a claim: the segment is marked fetched if `done` (copied, or
    /// not needed), and the file completed when it was the last one.
    pub(super) fn release_segment(&mut self, id: EntryId, segment: u32, done: bool) {
        let segsize = self.segsize;
        let complete = self.update_progress(id, |progress| {
            progress.release(segment, done);
            progress.is_complete(segsize)
        });
        if let Some(complete) = complete
            && done
        {
            self.unflushed.insert(id);
            self.clear_failure(id);
            if complete {
                self.complete_file(id);
            }
        }
    }

    /// A client truncated file `id` to `size`.
    pub(super) fn truncate(&mut self, id: EntryId, size: u64) {
        self.update_progress(id, |progress| progress.truncate(size));
    }

    /// Marks the segments of `range` of file `id` not needed, except those
    /// being copied, which it returns (`None`: nothing left to copy).
    pub(super) fn drop_segments(&mut self, id: EntryId, range: Range<u32>) -> Option<Vec<u32>> {
        let segsize = self.segsize;
        let (busy, complete) = self.update_progress(id, |progress| {
            let busy = progress.drop_range(range);
            (busy, progress.is_complete(segsize))
        })?;
        self.unflushed.insert(id);
        if complete {
            self.complete_file(id);
        }
        Some(busy)
    }

    /// Files copied whole and not changed by a client, with their source
    /// path, size and ctime as dmm read them (when it knows the ctime).
    pub(super) fn copied_files(&self) -> Vec<(EntryId, PathBuf, u64, i64)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.state == EntryState::Done && !e.changed && e.source_ctime != 0)
            .filter_map(|(&id, e)| Some((id, e.source.clone()?, e.size, e.source_ctime)))
            .collect()
    }

    /// File `id`'s source changed to `size` bytes at `ctime`: its copy
    /// starts over (the target file was emptied and sized).
    pub(super) fn restart_copy(&mut self, id: EntryId, size: u64, ctime: i64) {
        let restarted = self.update_entry(id, |entry| {
            entry.size = size;
            entry.source_ctime = ctime;
            entry.progress = (size > 0).then(|| FileProgress::new(size, Default::default()));
            entry.state = if size > 0 {
                EntryState::Pending
            } else {
                EntryState::Done
            };
            entry.row(id)
        });
        if let Some(row) = restarted {
            self.batch.push(Change::Insert(row));
            if size > 0 {
                self.files.push_back(id);
            }
        }
    }

    /// The last segment is in: the file leaves the pending set.
    fn complete_file(&mut self, id: EntryId) {
        let completed = self.update_entry(id, |entry| {
            entry.progress = None;
            entry.state = EntryState::Done;
        });
        if completed.is_some() {
            self.batch.push(Change::State(id, EntryState::Done));
            self.unflushed.insert(id);
            self.settled += 1;
        }
    }

    /// Flags entry `id` changed through the access point. Returns whether
    /// it has marks not journaled yet (the flag included).
    pub(super) fn note_change(&mut self, id: EntryId) -> bool {
        let Some(entry) = self.entries.get_mut(&id) else {
            return false;
        };
        if !entry.changed {
            entry.changed = true;
            self.batch.push(Change::Changed(id));
            self.unflushed.insert(id);
        }
        self.unflushed.contains(&id)
    }

    pub(super) fn add_written(&mut self, bytes: u64) {
        self.counts.bytes_written += bytes;
    }
}

/// Failures and the journal batch.
impl State {
    /// Records that a background step on `id` failed with `message`; it is
    /// retried with backoff. An entry that is gone meanwhile (a client
    /// deleted it) has nothing left to retry.
    pub(super) fn record_failure(&mut self, id: EntryId, message: String) {
        let Some(entry) = self
            .entries
            .get(&id)
            .filter(|e| !e.names.is_empty() || id == ROOT)
        else {
            return;
        };
        let path = entry.source.clone().unwrap_or_default();
        let attempts = self.failures.get(&id).map_or(0, |f| f.row.attempts) + 1;
        let row = ErrorRow {
            entry: id,
            path: path.as_os_str().as_bytes().to_vec(),
            message,
            attempts,
            at: now_ms(),
        };
        if !self.failures.contains_key(&id) {
            self.counts.errors += 1;
        }
        self.batch.push(Change::RecordError(row.clone()));
        let retry_at = Some(Instant::now() + backoff(attempts));
        self.failures.insert(id, Failure { row, retry_at });
    }

    /// The target takes no more writes until an admin acts.
    pub(super) fn block(&mut self, why: Blocked) {
        self.blocked.get_or_insert(why);
    }

    pub(super) fn blocked(&self) -> Option<Blocked> {
        self.blocked.clone()
    }

    /// An admin acted: the block is lifted and every entry in error is
    /// tried again at once.
    pub(super) fn retry_now(&mut self) {
        self.blocked = None;
        let now = Instant::now();
        for failure in self.failures.values_mut() {
            failure.retry_at = Some(now);
        }
    }

    /// An admin asked to retry the entry at `path` (as the report shows
    /// it) now. Whether an entry there is in error (one whose retry is
    /// under way counts: it is retried already).
    pub(super) fn retry_path(&mut self, path: &str) -> bool {
        let now = Instant::now();
        let mut found = false;
        for failure in self.failures.values_mut() {
            if String::from_utf8_lossy(&failure.row.path) == path {
                if failure.is_waiting() {
                    failure.retry_at = Some(now);
                }
                found = true;
            }
        }
        found
    }

    pub(super) fn clear_failure(&mut self, id: EntryId) {
        if self.failures.remove(&id).is_some() {
            self.counts.errors -= 1;
            self.batch.push(Change::ClearError(id));
        }
    }

    /// Adds `changes` to the batch the next flush journals.
    pub(super) fn journal(&mut self, changes: impl IntoIterator<Item = Change>) {
        self.batch.extend(changes);
    }

    /// Puts back a batch the journal refused, before what was batched
    /// since.
    pub(super) fn put_back(&mut self, mut batch: Vec<Change>) {
        batch.append(&mut self.batch);
        self.batch = batch;
    }

    /// The changes to journal next: the batch, then the segment bitmap of
    /// every file whose marks changed (a file completed or deleted since
    /// has its final row in the batch instead).
    pub(super) fn take_batch(&mut self) -> Vec<Change> {
        let mut batch = std::mem::take(&mut self.batch);
        for id in self.unflushed.drain() {
            let progress = self.entries.get(&id).and_then(|e| e.progress.as_ref());
            if let Some(progress) = progress {
                batch.push(Change::Segments(id, progress.serialized()));
            }
        }
        batch
    }
}
