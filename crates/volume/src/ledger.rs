//! The chunk ledger: where each chunk's current data is, and the record of
//! every change to that, kept crash-safe.
//!
//! Client writes (through the virtual device), the copier and the
//! asynchronous mirror all move chunks between states; this is the one
//! place that does it, so the durability protocol (DESIGN.md, "Crash
//! safety") lives in one module:
//!
//! - a client-caused change is journaled when it is made, unless the chunk
//!   was copied (or filled) since the last checkpoint: its copy may not be
//!   durable yet, so the change is *deferred* until a flush makes it so;
//! - a copier-caused change is not journaled: the next checkpoint records
//!   it, after flushing the stores the copies went to;
//! - a client flush flushes both stores, journals the deferred changes that
//!   flush covers, then syncs the journal.
//!
//! When the state directory fails (full, read-only, failing), the ledger
//! *freezes*: nothing more is journaled and no client write changes a
//! chunk's state; each write goes to every store that holds its chunk
//! ([`Plan::frozen`](crate::strategy::Plan::frozen)). The chunks whose
//! record may not match their state in memory (changed since the last
//! checkpoint) are made equal on both stores before the next flush is
//! acknowledged, so that whatever record survives routes reads to a store
//! with every acknowledged write. The migration stops; the next checkpoint
//! that saves (the migration started again once there is room) thaws it.
//!
//! The ledger also counts completed client changes, which the copier uses
//! to detect a write that raced its unlocked read. They are counted per
//! shard of chunks, not per chunk, so that their memory stays the same
//! however large the volume: a change to another chunk of the same shard
//! only makes a copy look raced, and it is done again.

use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use dmm_store::{BlockStore, Error, Op, Result};
use parking_lot::Mutex;
use roaring::RoaringBitmap;

use crate::chunks::{ChunkMap, ChunkState};
use crate::error::{ErrorKind, MigrationError, Operation};
use crate::persist::{Journal, Phase, Record};

/// Shards of the client change counters: 256 KiB of counters at most,
/// and a volume of up to 64 Ki chunks (64 GiB at 1 MiB) has one per chunk.
const CHANGE_SHARDS: u64 = 1 << 16;

/// One of the two stores of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// Chunks copied (or filled) since the last checkpoint, whose copy may not
/// be durable yet, and the state changes of those chunks that wait for it.
///
/// Journaling such a change at once could, after a power failure, point
/// reads at a copy that never reached the disk. So it is kept here and
/// journaled by the next flush (client flush, FUA write or checkpoint),
/// once the copy is durable. Until then a crash simply forgets the change,
/// which only loses client writes that were never flushed.
#[derive(Default)]
struct Unsettled {
    /// Copied since the last checkpoint snapshot.
    recent: RoaringBitmap,
    /// Copied before the snapshot of the checkpoint in progress.
    flushing: RoaringBitmap,
    /// Changes of unsettled chunks, in order, numbered.
    deferred: Vec<Deferred>,
    next_change: u64,
    /// The number of the first change after the snapshot of the checkpoint
    /// in progress: a deferred change numbered below it is already in the
    /// snapshot, so it goes to the journal the snapshot replaces, never
    /// after the snapshot (where replaying it would undo a later change).
    boundary: Option<u64>,
}

/// A deferred change: its number, the chunk, the new state.
type Deferred = (u64, u64, ChunkState);

impl Unsettled {
    fn contains(&self, chunk: u64) -> bool {
        self.recent.contains(chunk as u32) || self.flushing.contains(chunk as u32)
    }

    /// Takes the deferred changes numbered below `before`.
    fn take_before(&mut self, before: u64) -> Vec<Deferred> {
        let ready = self
            .deferred
            .partition_point(|&(number, _, _)| number < before);
        self.deferred.drain(..ready).collect()
    }

    /// Takes the deferred changes of chunks copied before the checkpoint
    /// in progress, which its flush made durable.
    fn take_flushed(&mut self) -> Vec<Deferred> {
        let flushing = std::mem::take(&mut self.flushing);
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|&(_, chunk, _)| flushing.contains(chunk as u32));
        self.deferred = waiting;
        ready
    }
}

/// An open journal and the chunks it has records of: after a failure of
/// the state directory, their recorded state may not be the one in memory
/// (a record may never reach the disk).
struct Open {
    journal: Journal,
    chunks: RoaringBitmap,
}

impl Open {
    fn new(journal: Journal) -> Open {
        Open {
            journal,
            chunks: RoaringBitmap::new(),
        }
    }

    fn append(&mut self, record: Record) -> io::Result<()> {
        if let Record::Chunk { chunk, .. } = record {
            self.chunks.insert(chunk as u32);
        }
        self.journal.append(record)
    }
}

/// The journal of the current generation, and the previous ones until a
/// checkpoint that replaces them is saved (more than one only after a
/// checkpoint failed: each must still be synced by a flush).
struct Journals {
    current: Open,
    retiring: Vec<Open>,
    /// Set when a journal write or sync failed; cleared by a checkpoint
    /// whose snapshot was taken frozen.
    frozen: Option<Frozen>,
    /// The checkpoint in progress took its snapshot frozen: saving it
    /// records every state the journal no longer could.
    snapshot_frozen: bool,
}

/// Why the state directory cannot be written, and what must be settled
/// before a flush can be acknowledged.
struct Frozen {
    /// The file that could not be written.
    path: PathBuf,
    cause: Arc<io::Error>,
    /// Chunks whose record may not match their state in memory: each is
    /// copied to the store that lacks it, so both hold it.
    unsettled: RoaringBitmap,
}

/// The state of every chunk and its crash-safe record.
pub struct Ledger {
    chunks: Arc<ChunkMap>,
    /// The stores whose flushes make copies durable.
    source: Arc<dyn BlockStore>,
    destination: Arc<dyn BlockStore>,
    journals: Mutex<Journals>,
    /// Whether the ledger is frozen (the details are in `journals`).
    frozen: AtomicBool,
    /// One settling of frozen chunks at a time: a flush behind it waits
    /// until the chunks are equal on both stores.
    settling: tokio::sync::Mutex<()>,
    /// Journal records appended so far, and how many of them a completed
    /// sync covers: a sync waits for its own records, never returns early
    /// because another one is under way.
    appended: AtomicU64,
    synced: AtomicU64,
    /// One journal sync at a time; those waiting behind it are usually
    /// covered by it (group commit).
    syncing: tokio::sync::Mutex<()>,
    unsettled: Mutex<Unsettled>,
    /// Per shard of chunks (`chunk % len`), how many client changes have
    /// completed.
    changes: Box<[AtomicU32]>,
    /// The copier (or a fill) wrote to this store since the last
    /// checkpoint, which must then flush it: source, destination.
    copied_into: [AtomicBool; 2],
    /// A destination failure that left chunks dirty without a client
    /// seeing it (the source took the write).
    destination_failure: Mutex<Option<Error>>,
    /// What errors name: the migration.
    target: String,
}

impl Ledger {
    pub fn new(
        chunks: Arc<ChunkMap>,
        source: Arc<dyn BlockStore>,
        destination: Arc<dyn BlockStore>,
        journal: Journal,
        target: String,
    ) -> Ledger {
        Ledger {
            changes: (0..chunks.len().clamp(1, CHANGE_SHARDS))
                .map(|_| AtomicU32::new(0))
                .collect(),
            chunks,
            source,
            destination,
            journals: Mutex::new(Journals {
                current: Open::new(journal),
                retiring: Vec::new(),
                frozen: None,
                snapshot_frozen: false,
            }),
            frozen: AtomicBool::new(false),
            settling: tokio::sync::Mutex::new(()),
            appended: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            syncing: tokio::sync::Mutex::new(()),
            unsettled: Mutex::new(Unsettled::default()),
            copied_into: [AtomicBool::new(false), AtomicBool::new(false)],
            destination_failure: Mutex::new(None),
            target,
        }
    }

    pub fn chunks(&self) -> &Arc<ChunkMap> {
        &self.chunks
    }

    pub fn get(&self, chunk: u64) -> ChunkState {
        self.chunks.get(chunk)
    }

    /// Moves a chunk from `from` to `to` for a client, recording the
    /// change: journaled at once, or deferred until the chunk's fresh copy
    /// is durable. Serialized with every other change. False if it was not
    /// in `from`, or if the ledger is (or just became) frozen: the caller
    /// then writes where the chunk is ([`Ledger::is_frozen`]).
    pub fn change_state(&self, chunk: u64, from: ChunkState, to: ChunkState) -> bool {
        let mut journals = self.journals.lock();
        if journals.frozen.is_some() || self.chunks.get(chunk) != from {
            return false;
        }
        let mut unsettled = self.unsettled.lock();
        if unsettled.contains(chunk) {
            let number = unsettled.next_change;
            unsettled.next_change += 1;
            unsettled.deferred.push((number, chunk, to));
        } else if !self.append_all(&mut journals, &mut unsettled, false, &[(chunk, to)]) {
            return false;
        }
        self.chunks.set(chunk, to);
        true
    }

    /// Whether the state directory failed: no state changes until a
    /// checkpoint saves again.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// Why the ledger is frozen, as the migration's error.
    pub fn frozen_error(&self) -> Option<MigrationError> {
        let journals = self.journals.lock();
        let frozen = journals.frozen.as_ref()?;
        let detail = "the migration stopped; clients are served by the stores that hold \
                      their data; make room (or make it writable), then start it again";
        Some(
            MigrationError::new(ErrorKind::State, Operation::WriteState)
                .on(frozen.path.display().to_string())
                .with_detail(detail)
                .with_source(frozen.cause.clone()),
        )
    }

    /// Freezes the ledger after a journal failure on `path`: the chunks
    /// journaled since the last checkpoint, and those whose change waited
    /// for a flush, are to be settled.
    fn freeze(
        &self,
        journals: &mut Journals,
        unsettled: &mut Unsettled,
        path: PathBuf,
        cause: io::Error,
    ) {
        if journals.frozen.is_some() {
            return;
        }
        let mut chunks = journals.current.chunks.clone();
        for retiring in &journals.retiring {
            chunks |= &retiring.chunks;
        }
        chunks.extend(
            unsettled
                .deferred
                .drain(..)
                .map(|(_, chunk, _)| chunk as u32),
        );
        tracing::error!(
            path = %path.display(),
            %cause,
            "the migration state cannot be written: the migration stops; \
             client writes go to every store that holds their chunk"
        );
        journals.frozen = Some(Frozen {
            path,
            cause: Arc::new(cause),
            unsettled: chunks,
        });
        self.frozen.store(true, Ordering::Release);
    }

    /// Takes the chunks to settle before a flush is acknowledged, with the
    /// lock that keeps other flushes waiting until they are settled.
    pub async fn frozen_unsettled(&self) -> (tokio::sync::MutexGuard<'_, ()>, RoaringBitmap) {
        let settling = self.settling.lock().await;
        let chunks = match self.journals.lock().frozen.as_mut() {
            Some(frozen) => std::mem::take(&mut frozen.unsettled),
            None => RoaringBitmap::new(),
        };
        (settling, chunks)
    }

    /// Gives back chunks a settling could not copy, for the next flush.
    pub fn still_unsettled(&self, chunks: RoaringBitmap) {
        if let Some(frozen) = self.journals.lock().frozen.as_mut() {
            frozen.unsettled |= chunks;
        }
    }

    /// The copier (or a fill, or the asynchronous mirror) wrote to `side`:
    /// the next checkpoint flushes it. Called once the write has
    /// completed, never before: a checkpoint that took the mark while the
    /// write was still in flight would flush too early, and the next one
    /// would see no mark and record the copy without flushing it.
    fn wrote_into(&self, side: Side) {
        self.copied_into[side as usize].store(true, Ordering::Release);
    }

    /// Records that a chunk was just copied (or filled) into `side`: the
    /// next checkpoint flushes it, and the chunk's state changes wait for
    /// the copy to be durable.
    pub fn copied(&self, chunk: u64, side: Side) {
        self.wrote_into(side);
        self.unsettled.lock().recent.insert(chunk as u32);
    }

    /// Moves a chunk whose copy into `side` just landed from `from` to
    /// `to`, without journaling (the next checkpoint records it, after
    /// flushing `side`); false if it was not in `from`.
    pub fn copy_landed(
        &self,
        chunk: u64,
        (from, to): (ChunkState, ChunkState),
        side: Side,
    ) -> bool {
        // Marked before the move: a checkpoint whose snapshot has the new
        // state also sees the mark.
        self.wrote_into(side);
        let moved = self.chunks.transition(chunk, from, to);
        if moved && to == ChunkState::Both {
            self.unsettled.lock().recent.insert(chunk as u32);
        }
        moved
    }

    /// Moves a run of chunks that needed no data copied (zeroes on both
    /// sides, or zeroed on `side` in one step) from `from` to `to`, as if
    /// each had been copied: the next checkpoint flushes `side` and records
    /// them.
    pub fn run_landed(&self, chunks: Range<u64>, from: ChunkState, to: ChunkState, side: Side) {
        self.wrote_into(side);
        for chunk in chunks.clone() {
            self.chunks.transition(chunk, from, to);
        }
        if to == ChunkState::Both {
            let run = chunks.start as u32..chunks.end as u32;
            self.unsettled.lock().recent.insert_range(run);
        }
    }

    /// Counts a completed client change of the chunks.
    pub fn changed(&self, chunks: Range<u64>) {
        let shards = self.changes.len() as u64;
        let end = chunks.end.min(chunks.start + shards);
        for chunk in chunks.start..end {
            self.changes[self.shard(chunk)].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// How many client changes of `chunk`'s shard have completed: the same
    /// number before and after a copy means no client changed `chunk`
    /// meanwhile.
    pub fn changes(&self, chunk: u64) -> u32 {
        self.changes[self.shard(chunk)].load(Ordering::Acquire)
    }

    fn shard(&self, chunk: u64) -> usize {
        (chunk % self.changes.len() as u64) as usize
    }

    /// Records a destination failure that a client did not see.
    pub fn destination_failed(&self, err: Error) {
        tracing::warn!("destination write failed: {err:?}");
        self.destination_failure.lock().get_or_insert(err);
    }

    /// Takes the destination failure a client write ran into, if any.
    pub fn take_destination_failure(&self) -> Option<Error> {
        self.destination_failure.lock().take()
    }

    /// Journals a phase change; the caller syncs it.
    pub fn record_phase(&self, phase: Phase) -> std::result::Result<(), MigrationError> {
        let mut journals = self.journals.lock();
        if journals.frozen.is_none() {
            let appended = journals.current.append(Record::Phase(phase));
            match appended {
                Ok(()) => {
                    self.appended.fetch_add(1, Ordering::AcqRel);
                    return Ok(());
                }
                Err(err) => {
                    let path = journals.current.journal.path().to_owned();
                    self.freeze(&mut journals, &mut self.unsettled.lock(), path, err);
                }
            }
        }
        drop(journals);
        Err(self.frozen_error().expect("frozen"))
    }

    /// Whether changes wait for a flush.
    pub fn has_deferred(&self) -> bool {
        !self.unsettled.lock().deferred.is_empty()
    }

    /// What a FUA write waits for before it is acknowledged: every change
    /// made durable if some wait for a flush, else the journal synced if
    /// the write `changed_states`.
    pub async fn make_fua_durable(&self, changed_states: bool) -> Result<()> {
        if self.has_deferred() {
            self.make_durable().await
        } else if changed_states {
            self.sync_journal().await
        } else {
            Ok(())
        }
    }

    /// Makes every recorded change durable: flushes both stores, journals
    /// the changes that waited for that, and syncs the journal. This is
    /// what a client flush (and a FUA write that changed states) waits for.
    /// Fails if the ledger is (or becomes) frozen: the caller then settles.
    pub async fn make_durable(&self) -> Result<()> {
        // Changes recorded before the flush starts rely on copies that
        // completed before it, which the flush makes durable.
        let before = self.unsettled.lock().next_change;
        tokio::try_join!(self.source.flush(), self.destination.flush())?;
        let appended = {
            let mut journals = self.journals.lock();
            let mut unsettled = self.unsettled.lock();
            let ready = unsettled.take_before(before);
            let boundary = unsettled.boundary;
            self.append_deferred(&mut journals, &mut unsettled, ready, boundary)
        };
        match appended {
            true => self.sync_journal().await,
            false => Err(self.frozen_store_error()),
        }
    }

    /// Makes the source and the journal durable, when the destination
    /// cannot be flushed: the changes that wait for a flush of both stores
    /// keep waiting.
    pub async fn make_source_durable(&self) -> Result<()> {
        self.source.flush().await?;
        self.sync_journal().await
    }

    /// Makes the journal durable (after the stores were flushed): every
    /// record appended before the call, whoever appended it. A failure
    /// freezes the ledger.
    pub async fn sync_journal(&self) -> Result<()> {
        if self.is_frozen() {
            return Err(self.frozen_store_error());
        }
        let wanted = self.appended.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= wanted {
            return Ok(());
        }
        let _one_at_a_time = self.syncing.lock().await;
        if self.synced.load(Ordering::Acquire) >= wanted {
            return Ok(());
        }
        // The sync below starts after every record counted here.
        let covering = self.appended.load(Ordering::Acquire);
        let (current, retiring) = {
            let journals = self.journals.lock();
            let retiring: Vec<_> = journals
                .retiring
                .iter()
                .map(|r| r.journal.handle())
                .collect();
            (journals.current.journal.handle(), retiring)
        };
        let synced = tokio::task::spawn_blocking(move || {
            retiring.iter().try_for_each(|file| file.sync())?;
            current.sync()
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        if let Err(err) = synced {
            {
                let mut journals = self.journals.lock();
                let path = journals.current.journal.path().to_owned();
                self.freeze(&mut journals, &mut self.unsettled.lock(), path, err);
            }
            return Err(self.frozen_store_error());
        }
        self.synced.fetch_max(covering, Ordering::AcqRel);
        Ok(())
    }

    /// A client-facing error for a flush the journal could not make
    /// durable.
    fn frozen_store_error(&self) -> Error {
        let journals = self.journals.lock();
        let (path, cause) = match &journals.frozen {
            Some(frozen) => (frozen.path.display().to_string(), &frozen.cause),
            None => return Error::io(Op::Flush, self.target.as_str(), io::Error::other("frozen")),
        };
        let err = io::Error::new(cause.kind(), cause.to_string());
        Error::io(Op::Flush, path, err)
    }

    /// The current journal generation.
    pub fn generation(&self) -> u64 {
        self.journals.lock().current.journal.generation()
    }

    /// A checkpoint begins: switches to the journal of the next generation
    /// and snapshots every state, as (`Both`, `Destination`) bitmaps.
    /// Chunks copied so far will be durable once the checkpoint has flushed
    /// the stores ([`Ledger::settle_checkpoint`]).
    pub fn begin_checkpoint(&self, next: Journal) -> (RoaringBitmap, RoaringBitmap) {
        {
            let mut journals = self.journals.lock();
            let mut unsettled = self.unsettled.lock();
            let recent = std::mem::take(&mut unsettled.recent);
            unsettled.flushing |= recent;
            unsettled.boundary = Some(unsettled.next_change);
            journals.snapshot_frozen = journals.frozen.is_some();
            let old = std::mem::replace(&mut journals.current, Open::new(next));
            journals.retiring.push(old);
        }
        self.chunks.to_bitmaps()
    }

    /// Flushes the stores the copier wrote to since the last checkpoint,
    /// so the copies before the snapshot are durable, journals the changes
    /// that waited for them, and syncs the journals. A snapshot taken
    /// frozen relies on every write since the last checkpoint, not only on
    /// copies: both stores are flushed, and nothing is journaled.
    pub async fn settle_checkpoint(&self) -> Result<()> {
        let snapshot_frozen = self.journals.lock().snapshot_frozen;
        let (into_source, into_destination) = (
            self.take_copied_into(Side::Source) || snapshot_frozen,
            self.take_copied_into(Side::Destination) || snapshot_frozen,
        );
        tokio::try_join!(
            flush_if(into_source, &self.source),
            flush_if(into_destination, &self.destination)
        )?;
        if snapshot_frozen {
            return Ok(());
        }
        let appended = {
            let mut journals = self.journals.lock();
            let mut unsettled = self.unsettled.lock();
            let ready = unsettled.take_flushed();
            let boundary = unsettled.boundary;
            self.append_deferred(&mut journals, &mut unsettled, ready, boundary)
        };
        match appended {
            true => self.sync_journal().await,
            false => Err(self.frozen_store_error()),
        }
    }

    /// The checkpoint is saved: the previous journal is no longer needed,
    /// and a snapshot taken frozen thaws the ledger.
    pub fn retire_previous_journal(&self) {
        let mut journals = self.journals.lock();
        journals.retiring.clear();
        self.unsettled.lock().boundary = None;
        if std::mem::take(&mut journals.snapshot_frozen) {
            journals.frozen = None;
            self.frozen.store(false, Ordering::Release);
            tracing::info!("the migration state is written again");
        }
    }

    /// Whether the copier wrote to `side` since the last call.
    fn take_copied_into(&self, side: Side) -> bool {
        self.copied_into[side as usize].swap(false, Ordering::AcqRel)
    }

    /// Journals deferred changes now durable: those made before the
    /// snapshot of the checkpoint in progress (`boundary`) in the journal
    /// that snapshot replaces, the others in the current one. False if
    /// the ledger is (or became) frozen.
    fn append_deferred(
        &self,
        journals: &mut Journals,
        unsettled: &mut Unsettled,
        changes: Vec<Deferred>,
        boundary: Option<u64>,
    ) -> bool {
        let (before, after): (Vec<Deferred>, Vec<Deferred>) = changes
            .into_iter()
            .partition(|&(number, _, _)| boundary.is_some_and(|b| number < b));
        let strip = |list: Vec<Deferred>| -> Vec<(u64, ChunkState)> {
            list.into_iter()
                .map(|(_, chunk, state)| (chunk, state))
                .collect()
        };
        let (before, after) = (strip(before), strip(after));
        let retiring = !journals.retiring.is_empty();
        let appended = self.append_all(journals, unsettled, retiring, &before)
            && self.append_all(journals, unsettled, false, &after);
        if !appended && let Some(frozen) = journals.frozen.as_mut() {
            // Taken from the deferred list, so the freeze did not see
            // them: some may not have been journaled.
            let chunks = before.iter().chain(&after).map(|&(chunk, _)| chunk as u32);
            frozen.unsettled.extend(chunks);
        }
        appended
    }

    /// Appends changes to the current journal (or the retiring one); on a
    /// failure freezes the ledger. False if it is frozen.
    fn append_all(
        &self,
        journals: &mut Journals,
        unsettled: &mut Unsettled,
        retiring: bool,
        changes: &[(u64, ChunkState)],
    ) -> bool {
        if journals.frozen.is_some() {
            return false;
        }
        let open = match (retiring, journals.retiring.last_mut()) {
            (true, Some(open)) => open,
            _ => &mut journals.current,
        };
        for &(chunk, state) in changes {
            if let Err(err) = open.append(Record::Chunk { chunk, state }) {
                let path = open.journal.path().to_owned();
                self.freeze(journals, unsettled, path, err);
                return false;
            }
        }
        self.appended
            .fetch_add(changes.len() as u64, Ordering::AcqRel);
        true
    }
}

/// Flushes `store` if `wrote`.
async fn flush_if(wrote: bool, store: &Arc<dyn BlockStore>) -> Result<()> {
    match wrote {
        true => store.flush().await,
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::StateDir;
    use dmm_store::MemoryStore;

    const CHUNK: u64 = 4096;

    fn ledger(state: &StateDir) -> Ledger {
        let store = || Arc::new(MemoryStore::new(4 * CHUNK)) as Arc<dyn BlockStore>;
        let chunks = Arc::new(ChunkMap::new(4 * CHUNK, CHUNK));
        let journal = state.journal(0).unwrap();
        Ledger::new(chunks, store(), store(), journal, "test".into())
    }

    fn moved(chunk: u64, state: ChunkState) -> Record {
        Record::Chunk { chunk, state }
    }

    #[tokio::test]
    async fn a_change_of_a_fresh_copy_waits_for_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let ledger = ledger(&state);
        let copy = (ChunkState::Source, ChunkState::Both);
        assert!(ledger.copy_landed(1, copy, Side::Destination));
        assert!(!ledger.copy_landed(1, copy, Side::Destination));
        assert!(ledger.change_state(1, ChunkState::Both, ChunkState::Source));
        assert!(ledger.change_state(2, ChunkState::Source, ChunkState::Destination));
        assert!(!ledger.change_state(3, ChunkState::Both, ChunkState::Source));
        assert_eq!(
            ledger.get(1),
            ChunkState::Source,
            "the change is made at once"
        );
        assert_eq!(
            state.replay(0).unwrap(),
            vec![moved(2, ChunkState::Destination)],
            "only the change of a chunk not copied since the checkpoint is journaled"
        );
        assert!(ledger.has_deferred());
        ledger.make_durable().await.unwrap();
        assert!(!ledger.has_deferred());
        assert_eq!(
            state.replay(0).unwrap(),
            vec![
                moved(2, ChunkState::Destination),
                moved(1, ChunkState::Source)
            ]
        );
    }

    #[tokio::test]
    async fn a_checkpoint_settles_only_the_copies_before_its_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let ledger = ledger(&state);
        ledger.copy_landed(0, (ChunkState::Source, ChunkState::Both), Side::Destination);
        let (both, destination) = ledger.begin_checkpoint(state.journal(1).unwrap());
        assert_eq!(ledger.generation(), 1);
        assert!(both.contains(0) && destination.is_empty());
        ledger.copy_landed(3, (ChunkState::Source, ChunkState::Both), Side::Destination);
        ledger.change_state(0, ChunkState::Both, ChunkState::Source);
        ledger.change_state(3, ChunkState::Both, ChunkState::Destination);
        ledger.settle_checkpoint().await.unwrap();
        assert_eq!(state.replay(1).unwrap(), vec![moved(0, ChunkState::Source)]);
        assert!(
            ledger.has_deferred(),
            "the copy after the snapshot is not settled"
        );
        ledger.retire_previous_journal();
        ledger.record_phase(Phase::SwitchedOver).unwrap();
        ledger.make_durable().await.unwrap();
        assert_eq!(
            state.replay(1).unwrap(),
            vec![
                moved(0, ChunkState::Source),
                Record::Phase(Phase::SwitchedOver),
                moved(3, ChunkState::Destination),
            ]
        );
    }

    #[tokio::test]
    async fn a_change_made_before_a_snapshot_is_never_replayed_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let ledger = ledger(&state);
        let copy = (ChunkState::Source, ChunkState::Both);
        ledger.copy_landed(0, copy, Side::Destination);
        // Dirtied while its copy is not durable: deferred.
        ledger.change_state(0, ChunkState::Both, ChunkState::Source);
        // Copied again (the switchover's last copies), then a checkpoint.
        ledger.copy_landed(0, copy, Side::Destination);
        let (both, _) = ledger.begin_checkpoint(state.journal(1).unwrap());
        assert!(both.contains(0), "the snapshot has the later copy");
        ledger.settle_checkpoint().await.unwrap();
        assert_eq!(
            state.replay(1).unwrap(),
            vec![],
            "replaying the older change over the snapshot would undo the copy"
        );
        assert_eq!(
            state.replay(0).unwrap(),
            vec![moved(0, ChunkState::Source)],
            "it belongs to the journal the snapshot replaces"
        );
    }
}
