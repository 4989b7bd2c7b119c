//! The virtual device: one volume backed by a source and a destination.
//!
//! This is what the NBD server exports for the whole migration, so clients
//! never reconnect. Every request is routed by the current [`Mode`] and the
//! state of each chunk it touches ([`crate::strategy`] has the rules):
//!
//! - client requests pass a *gate* (a read lock on the mode), so that a
//!   switchover can wait for in-flight requests, hold new ones for the
//!   moment it takes to flip the mode, and measure that pause;
//! - they take shared locks on their chunks; the copier and fills take
//!   exclusive ones, so a copy never races a write;
//! - a state change caused by a write is journaled before the data goes to
//!   a store (see [`crate::persist`]); a flush flushes both stores and then
//!   the journal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use dmm_store::{
    BlockStore, Capabilities, Error, Extent, ExtentKind, Op, Result, ZeroMode, check_range,
    coalesce,
};
use parking_lot::Mutex;
use tokio::sync::RwLock;

use crate::aio::AioQueue;
use crate::chunks::{ChunkMap, ChunkState};
use crate::copy::{copy_range, read_range, write_pieces};
use crate::locks::{ChunkGuard, ChunkLocks};
use crate::persist::{Journal, Record};
use crate::strategy::{Change, Fill, Mode, Plan};

/// Counters of client activity, for reports and benchmarks.
#[derive(Default)]
pub struct ClientStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Bytes clients caused to be written to the destination.
    pub destination_bytes: AtomicU64,
    /// Longest time a request waited at the gate, in microseconds.
    pub longest_gate_wait_us: AtomicU64,
    /// When the last request arrived (ms since the device was built).
    pub last_request_ms: AtomicU64,
}

/// What a change writes.
#[derive(Clone)]
enum Payload {
    Data(Bytes),
    Zeroes(ZeroMode),
    Discard,
}

impl Payload {
    fn change(&self) -> Change {
        match self {
            Payload::Discard => Change::Discard,
            _ => Change::Write,
        }
    }

    fn slice(&self, start: u64, len: u64) -> Payload {
        match self {
            Payload::Data(data) => {
                Payload::Data(data.slice(start as usize..(start + len) as usize))
            }
            other => other.clone(),
        }
    }

    async fn apply(&self, store: &dyn BlockStore, offset: u64, len: u64, fua: bool) -> Result<()> {
        match self {
            Payload::Data(data) => store.write(offset, data.clone(), fua).await,
            Payload::Zeroes(mode) => store.write_zeroes(offset, len, *mode, fua).await,
            Payload::Discard => store.discard(offset, len, fua).await,
        }
    }
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
    recent: roaring::RoaringBitmap,
    /// Copied before the snapshot of the checkpoint in progress.
    flushing: roaring::RoaringBitmap,
    /// Changes of unsettled chunks, in order, numbered.
    deferred: Vec<(u64, u64, ChunkState)>,
    next_change: u64,
}

impl Unsettled {
    fn contains(&self, chunk: u64) -> bool {
        self.recent.contains(chunk as u32) || self.flushing.contains(chunk as u32)
    }
}

/// The volume clients see during a migration.
pub struct VirtualDevice {
    source: Arc<dyn BlockStore>,
    destination: Arc<dyn BlockStore>,
    /// Handles for bulk I/O: copies, fills, verification (see
    /// `BlockStore::bulk`).
    bulk_source: Arc<dyn BlockStore>,
    bulk_destination: Arc<dyn BlockStore>,
    chunks: Arc<ChunkMap>,
    locks: Arc<ChunkLocks>,
    gate: RwLock<Mode>,
    journal: Mutex<Journal>,
    journal_unsynced: AtomicBool,
    /// The previous journal, until the checkpoint that replaces it is saved.
    retiring: Mutex<Option<Arc<std::fs::File>>>,
    unsettled: Mutex<Unsettled>,
    aio: Mutex<Option<Arc<AioQueue>>>,
    /// A destination failure seen by a client write the source survived.
    destination_failure: Mutex<Option<Error>>,
    stats: ClientStats,
    /// Per chunk, how many client changes have completed: a copy read
    /// without a lock is only used if this did not move meanwhile.
    changes: Box<[std::sync::atomic::AtomicU32]>,
    /// The copier (or a fill) wrote to this store since the last
    /// checkpoint, which must then flush it.
    copied_into_source: AtomicBool,
    copied_into_destination: AtomicBool,
    born: Instant,
    target: String,
}

impl VirtualDevice {
    pub fn new(
        source: Arc<dyn BlockStore>,
        destination: Arc<dyn BlockStore>,
        chunks: Arc<ChunkMap>,
        mode: Mode,
        journal: Journal,
    ) -> VirtualDevice {
        let target = format!("migration {} -> {}", source.target(), destination.target());
        let count = chunks.len();
        VirtualDevice {
            bulk_source: source.bulk().unwrap_or_else(|| source.clone()),
            bulk_destination: destination.bulk().unwrap_or_else(|| destination.clone()),
            source,
            destination,
            chunks,
            locks: ChunkLocks::new(),
            gate: RwLock::new(mode),
            journal: Mutex::new(journal),
            journal_unsynced: AtomicBool::new(false),
            retiring: Mutex::new(None),
            unsettled: Mutex::new(Unsettled::default()),
            aio: Mutex::new(None),
            destination_failure: Mutex::new(None),
            stats: ClientStats::default(),
            changes: (0..count)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            copied_into_source: AtomicBool::new(false),
            copied_into_destination: AtomicBool::new(false),
            born: Instant::now(),
            target,
        }
    }

    pub fn source(&self) -> &Arc<dyn BlockStore> {
        &self.source
    }

    pub fn destination(&self) -> &Arc<dyn BlockStore> {
        &self.destination
    }

    pub fn chunks(&self) -> &Arc<ChunkMap> {
        &self.chunks
    }

    pub fn locks(&self) -> &Arc<ChunkLocks> {
        &self.locks
    }

    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    pub async fn mode(&self) -> Mode {
        *self.gate.read().await
    }

    /// Holds client requests back while the returned guard lives: requests
    /// in flight finish first.
    pub async fn pause_clients(&self) -> tokio::sync::RwLockWriteGuard<'_, Mode> {
        self.gate.write().await
    }

    /// Milliseconds since the last client request arrived.
    pub fn idle_ms(&self) -> u64 {
        let now = self.born.elapsed().as_millis() as u64;
        now.saturating_sub(self.stats.last_request_ms.load(Ordering::Relaxed))
    }

    pub fn attach_aio(&self, queue: Option<Arc<AioQueue>>) {
        *self.aio.lock() = queue;
    }

    /// Records a destination failure that a client did not see (the source
    /// took the write).
    pub fn destination_failed(&self, err: Error) {
        tracing::warn!("destination write failed: {err:?}");
        self.destination_failure.lock().get_or_insert(err);
    }

    /// The aio queue, while an aio copy phase runs.
    pub fn aio_attached(&self) -> Option<Arc<AioQueue>> {
        self.aio.lock().clone()
    }

    /// Takes the destination failure a client write ran into, if any.
    pub fn take_destination_failure(&self) -> Option<Error> {
        self.destination_failure.lock().take()
    }

    /// Records that a chunk was just copied (its state changes now wait for
    /// the copy to be durable).
    pub fn copied(&self, chunk: u64) {
        self.unsettled.lock().recent.insert(chunk as u32);
    }

    /// The journal's current generation.
    pub fn journal_generation(&self) -> u64 {
        self.journal.lock().generation()
    }

    /// Starts a new journal generation (a checkpoint begins); chunks copied
    /// so far will be durable once the checkpoint has flushed the stores.
    pub fn rotate_journal(&self, next: Journal) {
        let mut journal = self.journal.lock();
        let mut unsettled = self.unsettled.lock();
        let recent = std::mem::take(&mut unsettled.recent);
        unsettled.flushing |= recent;
        let old = std::mem::replace(&mut *journal, next);
        *self.retiring.lock() = Some(old.handle());
        self.journal_unsynced.store(true, Ordering::Release);
    }

    /// The checkpoint flushed the stores: copies made before its snapshot
    /// are durable, so the changes waiting for them go to the journal.
    pub fn settle_flushed(&self) -> Result<()> {
        let mut journal = self.journal.lock();
        let mut unsettled = self.unsettled.lock();
        let flushing = std::mem::take(&mut unsettled.flushing);
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut unsettled.deferred)
            .into_iter()
            .partition(|&(_, chunk, _)| flushing.contains(chunk as u32));
        unsettled.deferred = waiting;
        let ready: Vec<_> = ready
            .into_iter()
            .map(|(_, chunk, state)| (chunk, state))
            .collect();
        self.append_all(&mut journal, &ready)
    }

    /// The checkpoint is saved: the previous journal is no longer needed.
    pub fn retire_previous_journal(&self) {
        self.retiring.lock().take();
    }

    fn append_all(&self, journal: &mut Journal, changes: &[(u64, ChunkState)]) -> Result<()> {
        for &(chunk, state) in changes {
            journal
                .append(Record::Chunk { chunk, state })
                .map_err(|e| Error::io(Op::Write, self.target.as_str(), e))?;
        }
        if !changes.is_empty() {
            self.journal_unsynced.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Appends a record; the caller has made sure the data it depends on is
    /// in place.
    pub fn journal(&self, record: Record) -> std::io::Result<()> {
        self.journal.lock().append(record)?;
        self.journal_unsynced.store(true, Ordering::Release);
        Ok(())
    }

    /// Moves a chunk from `from` to `to` (false if it was not in `from`),
    /// recording the change: journaled at once, or deferred until the
    /// chunk's fresh copy is durable. Serialized with every other change.
    pub fn change_state(&self, chunk: u64, from: ChunkState, to: ChunkState) -> Result<bool> {
        let mut journal = self.journal.lock();
        if self.chunks.get(chunk) != from {
            return Ok(false);
        }
        let mut unsettled = self.unsettled.lock();
        if unsettled.contains(chunk) {
            let number = unsettled.next_change;
            unsettled.next_change += 1;
            unsettled.deferred.push((number, chunk, to));
        } else {
            self.append_all(&mut journal, &[(chunk, to)])?;
        }
        self.chunks.set(chunk, to);
        Ok(true)
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
            let mut journal = self.journal.lock();
            let mut unsettled = self.unsettled.lock();
            let ready = unsettled
                .deferred
                .partition_point(|&(number, _, _)| number < before);
            let ready: Vec<_> = unsettled
                .deferred
                .drain(..ready)
                .map(|(_, chunk, state)| (chunk, state))
                .collect();
            drop(unsettled);
            self.append_all(&mut journal, &ready)?;
        }
        self.sync_journal().await
    }

    fn has_deferred(&self) -> bool {
        !self.unsettled.lock().deferred.is_empty()
    }

    /// Makes the journal durable (after the stores were flushed).
    pub async fn sync_journal(&self) -> Result<()> {
        if !self.journal_unsynced.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let current = self.journal.lock().handle();
        let retiring = self.retiring.lock().clone();
        let synced = tokio::task::spawn_blocking(move || {
            retiring.map_or(Ok(()), |file| file.sync_data())?;
            current.sync_data()
        })
        .await;
        synced
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map_err(|e| {
                self.journal_unsynced.store(true, Ordering::Release);
                Error::io(Op::Flush, self.target.as_str(), e)
            })
    }

    /// Copies one chunk between the stores under an exclusive lock, if it
    /// is still in `from`; returns the bytes written, or `None` if there was
    /// nothing to do.
    ///
    /// The chunk is read without a lock; the lock is taken only to write it
    /// to the other store, and only if no client changed the chunk while it
    /// was read (otherwise the read is redone). Clients wait at most for
    /// one chunk write, not for a whole copy.
    pub async fn copy_chunk(
        &self,
        chunk: u64,
        from: ChunkState,
        to: ChunkState,
    ) -> Result<Option<crate::copy::Copied>> {
        let (offset, len) = self.chunks.bytes(chunk);
        let (reader, writer, wrote) = if from == ChunkState::Destination {
            (
                &self.bulk_destination,
                &self.bulk_source,
                &self.copied_into_source,
            )
        } else {
            (
                &self.bulk_source,
                &self.bulk_destination,
                &self.copied_into_destination,
            )
        };
        for attempt in 0..4 {
            if self.chunks.get(chunk) != from {
                return Ok(None);
            }
            let changes = self.changes[chunk as usize].load(Ordering::Acquire);
            // The last attempt reads under the lock: no more retries.
            let pieces = match attempt < 3 {
                true => Some(read_range(&**reader, offset, len).await?),
                false => None,
            };
            let _guard = self.locks.exclusive(chunk..chunk + 1).await;
            if self.chunks.get(chunk) != from {
                return Ok(None);
            }
            let unchanged = self.changes[chunk as usize].load(Ordering::Acquire) == changes;
            let pieces = match pieces {
                Some(_) if !unchanged => continue,
                Some(pieces) => pieces,
                None => read_range(&**reader, offset, len).await?,
            };
            wrote.store(true, Ordering::Release);
            let copied = write_pieces(&**writer, pieces).await?;
            if let Some(queue) = self.aio_attached() {
                queue.copied(chunk);
            }
            if self.chunks.transition(chunk, from, to) && to == ChunkState::Both {
                self.copied(chunk);
            }
            return Ok(Some(copied));
        }
        unreachable!("the last attempt copies under the lock")
    }

    /// Which stores the copier wrote to since the last call: (source,
    /// destination). A checkpoint flushes those.
    pub fn take_copied_into(&self) -> (bool, bool) {
        (
            self.copied_into_source.swap(false, Ordering::AcqRel),
            self.copied_into_destination.swap(false, Ordering::AcqRel),
        )
    }

    /// Counts a completed client change of the chunks (see `copy_chunk`).
    fn changed(&self, chunks: std::ops::Range<u64>) {
        for chunk in chunks {
            self.changes[chunk as usize].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Compares one `Both` chunk on the two stores; `Some(false)` on a
    /// mismatch, `None` if the chunk is not in `Both`.
    ///
    /// Reads without a lock first, so clients are not held up: a chunk that
    /// is still in `Both` after both reads was not written in between (a
    /// write records leaving `Both` before its data goes out). Only a
    /// mismatch is looked at again, under an exclusive lock.
    pub async fn verify_chunk(&self, chunk: u64) -> Result<Option<bool>> {
        if self.chunks.get(chunk) != ChunkState::Both {
            return Ok(None);
        }
        if self.digests_match(chunk).await? && self.chunks.get(chunk) == ChunkState::Both {
            return Ok(Some(true));
        }
        let _guard = self.locks.exclusive(chunk..chunk + 1).await;
        if self.chunks.get(chunk) != ChunkState::Both {
            return Ok(None);
        }
        self.digests_match(chunk).await.map(Some)
    }

    async fn digests_match(&self, chunk: u64) -> Result<bool> {
        let (offset, len) = self.chunks.bytes(chunk);
        let (source, destination) = tokio::try_join!(
            chunk_digest(&*self.bulk_source, offset, len),
            chunk_digest(&*self.bulk_destination, offset, len)
        )?;
        Ok(source == destination)
    }

    async fn enter(&self) -> tokio::sync::RwLockReadGuard<'_, Mode> {
        let arrived = Instant::now();
        let now_ms = self.born.elapsed().as_millis() as u64;
        self.stats.last_request_ms.store(now_ms, Ordering::Relaxed);
        let guard = self.gate.read().await;
        let waited = arrived.elapsed().as_micros() as u64;
        self.stats
            .longest_gate_wait_us
            .fetch_max(waited, Ordering::Relaxed);
        guard
    }

    fn whole_chunk(&self, chunk: u64, offset: u64, len: u64) -> bool {
        let (start, size) = self.chunks.bytes(chunk);
        offset <= start && offset + len >= start + size
    }

    /// The plan for every chunk of a change.
    fn plans(&self, mode: Mode, offset: u64, len: u64, change: Change) -> Vec<(u64, Plan)> {
        self.chunks
            .span(offset, len)
            .map(|chunk| {
                let whole = self.whole_chunk(chunk, offset, len);
                (
                    chunk,
                    mode.plan_write(self.chunks.get(chunk), whole, change),
                )
            })
            .collect()
    }

    async fn change(&self, offset: u64, len: u64, payload: Payload, fua: bool) -> Result<()> {
        let mode = self.enter().await;
        let span = self.chunks.span(offset, len);
        if *mode == Mode::AsyncMirror
            && let Some(queue) = self.aio_attached()
        {
            return self.change_async(&queue, offset, len, payload, fua).await;
        }
        let mut guard: ChunkGuard = self.locks.shared(span.clone()).await;
        let mut plans = self.plans(*mode, offset, len, payload.change());
        if plans.iter().any(|(_, plan)| plan.fill.is_some()) {
            if matches!(payload, Payload::Discard) {
                // A discard is a hint: skip chunks that would need a fill.
                plans.retain(|(_, plan)| plan.fill.is_none());
            } else {
                drop(guard);
                guard = self.locks.exclusive(span).await;
                plans = self.plans(*mode, offset, len, payload.change());
                self.fill(&plans).await?;
            }
        }
        let before = self.record_transitions(&plans, Stage::BeforeData)?;
        let written = self.write_groups(offset, len, &plans, &payload, fua).await;
        self.changed(guard.chunks());
        written?;
        let after = self.record_transitions(&plans, Stage::AfterData)?;
        drop(guard);
        if fua && self.has_deferred() {
            self.make_durable().await?;
        } else if fua && (before || after) {
            self.sync_journal().await?;
        }
        Ok(())
    }

    /// A change in asynchronous-mirroring mode: to the source, and queued
    /// for the destination where the chunk's copy is being kept up.
    async fn change_async(
        &self,
        queue: &AioQueue,
        offset: u64,
        len: u64,
        payload: Payload,
        fua: bool,
    ) -> Result<()> {
        let span = self.chunks.span(offset, len);
        let _guard = self.locks.shared(span.clone()).await;
        let data = matches!(payload, Payload::Data(_));
        let mut reserved = Vec::new();
        for chunk in span.clone() {
            if queue.reserve(self, chunk, data)? {
                reserved.push(chunk);
            }
        }
        let written = payload.apply(&*self.source, offset, len, fua).await;
        self.changed(span.clone());
        if let Err(err) = written {
            reserved.iter().for_each(|&chunk| queue.release(chunk));
            return Err(err);
        }
        if let Payload::Data(bytes) = payload
            && !reserved.is_empty()
        {
            queue.push(offset, bytes, span, reserved).await;
        }
        if fua && self.has_deferred() {
            self.make_durable().await?;
        } else if fua {
            self.sync_journal().await?;
        }
        Ok(())
    }

    /// Makes partially written chunks whole on the side that will hold
    /// them, durably, before their state changes.
    async fn fill(&self, plans: &[(u64, Plan)]) -> Result<()> {
        for &(chunk, plan) in plans {
            let (from, to) = match plan.fill {
                Some(Fill::FromSource) => (&self.bulk_source, &self.bulk_destination),
                Some(Fill::FromDestination) => (&self.bulk_destination, &self.bulk_source),
                None => continue,
            };
            let (offset, len) = self.chunks.bytes(chunk);
            let wrote = match plan.fill == Some(Fill::FromDestination) {
                true => &self.copied_into_source,
                false => &self.copied_into_destination,
            };
            wrote.store(true, Ordering::Release);
            copy_range(&**from, &**to, offset, len).await?;
            // Like a copy, the fill becomes durable with the next flush;
            // the state change that relies on it waits until then.
            self.copied(chunk);
        }
        Ok(())
    }

    /// Records the state changes of a write that belong to `stage`; true if
    /// any was made.
    ///
    /// A chunk leaving `Both` (or just filled) is recorded before the data
    /// goes out: its new home already holds its current bytes, so the
    /// record never claims more than is there. A chunk whose new home gets
    /// its bytes only from this (whole-chunk) write is recorded after.
    fn record_transitions(&self, plans: &[(u64, Plan)], stage: Stage) -> Result<bool> {
        let mut changed = false;
        for &(chunk, plan) in plans {
            let Some((from, to)) = plan.transition else {
                continue;
            };
            let early = from == ChunkState::Both || plan.fill.is_some();
            if early == (stage == Stage::BeforeData) {
                changed |= self.change_state(chunk, from, to)?;
            }
        }
        Ok(changed)
    }

    /// Sends the change to the stores, one request per run of chunks with
    /// the same plan.
    async fn write_groups(
        &self,
        offset: u64,
        len: u64,
        plans: &[(u64, Plan)],
        payload: &Payload,
        fua: bool,
    ) -> Result<()> {
        let end = offset + len;
        let mut i = 0;
        while i < plans.len() {
            let plan = plans[i].1;
            let mut j = i + 1;
            while j < plans.len() && same_targets(&plans[j].1, &plan) {
                j += 1;
            }
            let first = self.chunks.bytes(plans[i].0).0.max(offset);
            let last = self.chunks.bytes(plans[j - 1].0);
            let stop = (last.0 + last.1).min(end);
            let part = payload.slice(first - offset, stop - first);
            self.write_group(first, stop - first, plan, part, fua, &plans[i..j])
                .await?;
            i = j;
        }
        Ok(())
    }

    async fn write_group(
        &self,
        offset: u64,
        len: u64,
        plan: Plan,
        payload: Payload,
        fua: bool,
        chunks: &[(u64, Plan)],
    ) -> Result<()> {
        let to_source = async {
            match plan.to_source {
                true => payload.apply(&*self.source, offset, len, fua).await,
                false => Ok(()),
            }
        };
        let to_destination = async {
            match plan.to_destination {
                true => payload.apply(&*self.destination, offset, len, fua).await,
                false => Ok(()),
            }
        };
        let (source, destination) = tokio::join!(to_source, to_destination);
        source?;
        if plan.to_destination {
            self.stats
                .destination_bytes
                .fetch_add(len, Ordering::Relaxed);
        }
        if let Err(err) = destination {
            if !plan.to_source {
                return Err(err);
            }
            // Mirrored write: the source has it, so the client succeeds;
            // the chunks are dirty again and the migration learns why.
            for &(chunk, _) in chunks {
                self.change_state(chunk, ChunkState::Both, ChunkState::Source)?;
            }
            self.destination_failed(err);
        }
        Ok(())
    }

    /// Reads from wherever each run of chunks is current.
    async fn routed<T, F>(&self, offset: u64, len: u64, mut run: F) -> Result<Vec<T>>
    where
        F: AsyncRun<T>,
    {
        let mode = self.enter().await;
        let _guard = self.locks.shared(self.chunks.span(offset, len)).await;
        let end = offset + len;
        let mut results = Vec::new();
        let mut chunk_iter = self.chunks.span(offset, len).peekable();
        while let Some(first) = chunk_iter.next() {
            let from_destination = mode.read_from_destination(self.chunks.get(first));
            let mut last = first;
            while let Some(&next) = chunk_iter.peek() {
                if mode.read_from_destination(self.chunks.get(next)) != from_destination {
                    break;
                }
                last = next;
                chunk_iter.next();
            }
            let start = self.chunks.bytes(first).0.max(offset);
            let (last_offset, last_len) = self.chunks.bytes(last);
            let stop = (last_offset + last_len).min(end);
            let store = if from_destination {
                &self.destination
            } else {
                &self.source
            };
            results.push(run.run(&**store, start, stop - start).await?);
        }
        Ok(results)
    }
}

/// A read-like operation run on one store for one byte range.
#[async_trait]
trait AsyncRun<T> {
    async fn run(&mut self, store: &dyn BlockStore, offset: u64, len: u64) -> Result<T>;
}

struct ReadRun;

#[async_trait]
impl AsyncRun<Vec<u8>> for ReadRun {
    async fn run(&mut self, store: &dyn BlockStore, offset: u64, len: u64) -> Result<Vec<u8>> {
        store.read(offset, len as usize).await
    }
}

struct ExtentsRun;

#[async_trait]
impl AsyncRun<Vec<Extent>> for ExtentsRun {
    async fn run(&mut self, store: &dyn BlockStore, offset: u64, len: u64) -> Result<Vec<Extent>> {
        // Report the whole run: a store may answer in several calls.
        let mut extents = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let part = store.extents(at, offset + len - at).await?;
            let Some(end) = part.last().map(|e| e.end()) else {
                extents.push(Extent::new(at, offset + len - at, ExtentKind::Data));
                break;
            };
            extents.extend(part);
            at = end;
        }
        Ok(extents)
    }
}

struct CacheRun;

#[async_trait]
impl AsyncRun<()> for CacheRun {
    async fn run(&mut self, store: &dyn BlockStore, offset: u64, len: u64) -> Result<()> {
        store.cache(offset, len).await
    }
}

fn same_targets(a: &Plan, b: &Plan) -> bool {
    a.to_source == b.to_source && a.to_destination == b.to_destination
}

/// When a transition is journaled relative to the data write.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    BeforeData,
    AfterData,
}

/// BLAKE3 of a chunk, skipping the read where the store reports zeroes.
async fn chunk_digest(store: &dyn BlockStore, offset: u64, len: u64) -> Result<blake3::Hash> {
    let extents = ExtentsRun.run(store, offset, len).await?;
    let mut hasher = blake3::Hasher::new();
    for extent in extents {
        if extent.kind.reads_as_zero() {
            hasher.update(&vec![0u8; extent.len as usize]);
        } else {
            hasher.update(&store.read(extent.offset, extent.len as usize).await?);
        }
    }
    Ok(hasher.finalize())
}

#[async_trait]
impl BlockStore for VirtualDevice {
    fn target(&self) -> &str {
        &self.target
    }

    fn size(&self) -> u64 {
        self.chunks.volume_size()
    }

    fn capabilities(&self) -> Capabilities {
        let (source, destination) = (self.source.capabilities(), self.destination.capabilities());
        Capabilities {
            read_only: destination.read_only,
            preferred_block_size: source
                .preferred_block_size
                .max(destination.preferred_block_size),
            rotational: destination.rotational,
            discard: true,
            fast_zero: source.fast_zero && destination.fast_zero,
            flush_covers_all_handles: true,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        check_range(self, Op::Read, offset, len as u64)?;
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut parts = self.routed(offset, len as u64, ReadRun).await?;
        Ok(if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            parts.concat()
        })
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let len = data.len() as u64;
        check_range(self, Op::Write, offset, len)?;
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_written.fetch_add(len, Ordering::Relaxed);
        if len == 0 {
            return Ok(());
        }
        self.change(offset, len, Payload::Data(data), fua).await
    }

    async fn flush(&self) -> Result<()> {
        let _mode = self.enter().await;
        self.make_durable().await
    }

    async fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        check_range(self, Op::Discard, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.change(offset, len, Payload::Discard, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()> {
        check_range(self, Op::WriteZeroes, offset, len)?;
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        if len == 0 {
            return Ok(());
        }
        self.change(offset, len, Payload::Zeroes(mode), fua).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self, Op::Extents, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let parts = self.routed(offset, len, ExtentsRun).await?;
        Ok(coalesce(parts.into_iter().flatten()))
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self, Op::Cache, offset, len)?;
        if len > 0 {
            self.routed(offset, len, CacheRun).await?;
        }
        Ok(())
    }
}

/// How long a client may have been idle before a low-priority copier runs
/// at full speed.
pub const CLIENT_QUIET: Duration = Duration::from_millis(10);
