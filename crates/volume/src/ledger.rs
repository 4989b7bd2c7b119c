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
//! The ledger also counts completed client changes, which the copier uses
//! to detect a write that raced its unlocked read. They are counted per
//! shard of chunks, not per chunk, so that their memory stays the same
//! however large the volume: a change to another chunk of the same shard
//! only makes a copy look raced, and it is done again.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use dmm_store::{BlockStore, Error, Op, Result};
use parking_lot::Mutex;
use roaring::RoaringBitmap;

use crate::chunks::{ChunkMap, ChunkState};
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

/// The journal of the current generation, and the previous one until the
/// checkpoint that replaces it is saved.
struct Journals {
    current: Journal,
    retiring: Option<Journal>,
}

/// The state of every chunk and its crash-safe record.
pub struct Ledger {
    chunks: Arc<ChunkMap>,
    /// The stores whose flushes make copies durable.
    source: Arc<dyn BlockStore>,
    destination: Arc<dyn BlockStore>,
    journals: Mutex<Journals>,
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
                current: journal,
                retiring: None,
            }),
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

    /// Moves a chunk from `from` to `to` for a client (false if it was not
    /// in `from`), recording the change: journaled at once, or deferred
    /// until the chunk's fresh copy is durable. Serialized with every
    /// other change.
    pub fn change_state(&self, chunk: u64, from: ChunkState, to: ChunkState) -> Result<bool> {
        let mut journals = self.journals.lock();
        if self.chunks.get(chunk) != from {
            return Ok(false);
        }
        let mut unsettled = self.unsettled.lock();
        if unsettled.contains(chunk) {
            let number = unsettled.next_change;
            unsettled.next_change += 1;
            unsettled.deferred.push((number, chunk, to));
        } else {
            self.append_all(&mut journals.current, &[(chunk, to)])?;
        }
        self.chunks.set(chunk, to);
        Ok(true)
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
    pub fn record_phase(&self, phase: Phase) -> std::io::Result<()> {
        self.journals.lock().current.append(Record::Phase(phase))?;
        self.appended.fetch_add(1, Ordering::AcqRel);
        Ok(())
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
    pub async fn make_durable(&self) -> Result<()> {
        // Changes recorded before the flush starts rely on copies that
        // completed before it, which the flush makes durable.
        let before = self.unsettled.lock().next_change;
        tokio::try_join!(self.source.flush(), self.destination.flush())?;
        {
            let mut journals = self.journals.lock();
            let mut unsettled = self.unsettled.lock();
            let ready = unsettled.take_before(before);
            self.append_deferred(&mut journals, ready, unsettled.boundary)?;
        }
        self.sync_journal().await
    }

    /// Makes the journal durable (after the stores were flushed): every
    /// record appended before the call, whoever appended it.
    pub async fn sync_journal(&self) -> Result<()> {
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
            let retiring = journals.retiring.as_ref().map(Journal::handle);
            (journals.current.handle(), retiring)
        };
        let synced = tokio::task::spawn_blocking(move || {
            retiring.map_or(Ok(()), |file| file.sync())?;
            current.sync()
        })
        .await;
        synced
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map_err(|e| Error::io(Op::Flush, self.target.as_str(), e))?;
        self.synced.fetch_max(covering, Ordering::AcqRel);
        Ok(())
    }

    /// The current journal generation.
    pub fn generation(&self) -> u64 {
        self.journals.lock().current.generation()
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
            let old = std::mem::replace(&mut journals.current, next);
            journals.retiring = Some(old);
        }
        self.chunks.to_bitmaps()
    }

    /// Flushes the stores the copier wrote to since the last checkpoint,
    /// so the copies before the snapshot are durable, journals the changes
    /// that waited for them, and syncs the journals.
    pub async fn settle_checkpoint(&self) -> Result<()> {
        let (into_source, into_destination) = (
            self.take_copied_into(Side::Source),
            self.take_copied_into(Side::Destination),
        );
        tokio::try_join!(
            flush_if(into_source, &self.source),
            flush_if(into_destination, &self.destination)
        )?;
        {
            let mut journals = self.journals.lock();
            let mut unsettled = self.unsettled.lock();
            let ready = unsettled.take_flushed();
            self.append_deferred(&mut journals, ready, unsettled.boundary)?;
        }
        self.sync_journal().await
    }

    /// The checkpoint is saved: the previous journal is no longer needed.
    pub fn retire_previous_journal(&self) {
        let mut journals = self.journals.lock();
        journals.retiring.take();
        self.unsettled.lock().boundary = None;
    }

    /// Whether the copier wrote to `side` since the last call.
    fn take_copied_into(&self, side: Side) -> bool {
        self.copied_into[side as usize].swap(false, Ordering::AcqRel)
    }

    /// Journals deferred changes now durable: those made before the
    /// snapshot of the checkpoint in progress (`boundary`) in the journal
    /// that snapshot replaces, the others in the current one.
    fn append_deferred(
        &self,
        journals: &mut Journals,
        changes: Vec<Deferred>,
        boundary: Option<u64>,
    ) -> Result<()> {
        let (before, after): (Vec<Deferred>, Vec<Deferred>) = changes
            .into_iter()
            .partition(|&(number, _, _)| boundary.is_some_and(|b| number < b));
        let strip = |list: Vec<Deferred>| -> Vec<(u64, ChunkState)> {
            list.into_iter()
                .map(|(_, chunk, state)| (chunk, state))
                .collect()
        };
        if let Some(retiring) = journals.retiring.as_mut() {
            self.append_all(retiring, &strip(before))?;
        } else {
            self.append_all(&mut journals.current, &strip(before))?;
        }
        self.append_all(&mut journals.current, &strip(after))
    }

    fn append_all(&self, journal: &mut Journal, changes: &[(u64, ChunkState)]) -> Result<()> {
        for &(chunk, state) in changes {
            journal
                .append(Record::Chunk { chunk, state })
                .map_err(|e| Error::io(Op::Write, self.target.as_str(), e))?;
        }
        self.appended
            .fetch_add(changes.len() as u64, Ordering::AcqRel);
        Ok(())
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
        assert!(
            ledger
                .change_state(1, ChunkState::Both, ChunkState::Source)
                .unwrap()
        );
        assert!(
            ledger
                .change_state(2, ChunkState::Source, ChunkState::Destination)
                .unwrap()
        );
        assert!(
            !ledger
                .change_state(3, ChunkState::Both, ChunkState::Source)
                .unwrap()
        );
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
        ledger
            .change_state(0, ChunkState::Both, ChunkState::Source)
            .unwrap();
        ledger
            .change_state(3, ChunkState::Both, ChunkState::Destination)
            .unwrap();
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
        ledger
            .change_state(0, ChunkState::Both, ChunkState::Source)
            .unwrap();
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
