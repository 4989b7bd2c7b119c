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
//! - the state changes a write causes go through the [`Ledger`], which
//!   decides what is journaled when; a flush flushes both stores and then
//!   the journal.
//!
//! The copier's side of the chunk-lock protocol (copying and verifying one
//! chunk while clients keep writing) is here too, since it must see the
//! same locks and the same asynchronous mirror as client writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use dmm_store::{
    BlockStore, Capabilities, Error, Extent, ExtentKind, Op, Result, ZeroMode, check_range,
    coalesce, start_writeback,
};
use parking_lot::Mutex;
use tokio::sync::RwLock;

use crate::aio::{AioQueue, MirrorTarget};
use crate::chunks::{ChunkMap, ChunkState};
use crate::copy::{Copied, copy_range, copy_range_in_kernel, read_range, write_pieces};
use crate::digest::{Lookahead, digest};
use crate::ledger::{Ledger, Side};
use crate::locks::{ChunkGuard, ChunkLocks};
use crate::pacing::{Active, ClientActivity};
use crate::persist::Journal;
use crate::progress::ClientStats;
use crate::strategy::{Change, Fill, Mode, Plan};

mod runs;

pub(crate) use runs::Run;

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

/// The volume clients see during a migration.
pub struct VirtualDevice {
    source: Arc<dyn BlockStore>,
    destination: Arc<dyn BlockStore>,
    /// Handles for bulk I/O: copies, fills, verification (see
    /// `BlockStore::bulk`).
    bulk_source: Arc<dyn BlockStore>,
    bulk_destination: Arc<dyn BlockStore>,
    ledger: Arc<Ledger>,
    locks: Arc<ChunkLocks>,
    gate: RwLock<Mode>,
    /// The mode as last seen through the gate, for reports.
    last_mode: Mutex<Mode>,
    aio: Mutex<Option<Arc<AioQueue>>>,
    /// Both stores are local files the kernel copies between.
    kernel_copies: AtomicBool,
    stats: Arc<ClientStats>,
    clients: ClientActivity,
    target: String,
    /// Digests of the destination computed where it lives, when it is on
    /// another node (`None`: read it and hash it here).
    remote_digests: std::sync::OnceLock<Lookahead>,
}

impl VirtualDevice {
    pub(crate) fn new(
        source: Arc<dyn BlockStore>,
        destination: Arc<dyn BlockStore>,
        chunks: Arc<ChunkMap>,
        mode: Mode,
        journal: Journal,
    ) -> VirtualDevice {
        let target = format!("migration {} -> {}", source.target(), destination.target());
        let ledger = Ledger::new(
            chunks,
            source.clone(),
            destination.clone(),
            journal,
            target.clone(),
        );
        let kernel_copies = source.local_file().is_some() && destination.local_file().is_some();
        VirtualDevice {
            bulk_source: source.bulk().unwrap_or_else(|| source.clone()),
            bulk_destination: destination.bulk().unwrap_or_else(|| destination.clone()),
            source,
            destination,
            ledger: Arc::new(ledger),
            locks: ChunkLocks::new(),
            gate: RwLock::new(mode),
            last_mode: Mutex::new(mode),
            aio: Mutex::new(None),
            kernel_copies: AtomicBool::new(kernel_copies),
            stats: Arc::new(ClientStats::default()),
            clients: ClientActivity::default(),
            target,
            remote_digests: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn chunks(&self) -> &Arc<ChunkMap> {
        self.ledger.chunks()
    }

    /// The chunk states and their crash-safe record.
    pub(crate) fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    pub(crate) fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// The routing mode for a report, without waiting at the gate: a
    /// report must never queue behind a switch (the task that reports may
    /// be the one that drives the switch); while clients are held it is
    /// the mode last seen.
    pub(crate) fn shown_mode(&self) -> Mode {
        match self.gate.try_read() {
            Ok(mode) => {
                *self.last_mode.lock() = *mode;
                *mode
            }
            Err(_) => *self.last_mode.lock(),
        }
    }

    /// Holds client requests back while the returned guard lives: requests
    /// in flight finish first.
    pub(crate) async fn pause_clients(&self) -> tokio::sync::RwLockWriteGuard<'_, Mode> {
        self.gate.write().await
    }

    /// Client requests in flight, for the copier's pacing.
    pub(crate) fn clients(&self) -> &ClientActivity {
        &self.clients
    }

    /// Starts asynchronous mirroring: client writes to copied chunks are
    /// queued for the destination until [`VirtualDevice::detach_aio`].
    pub(crate) fn start_aio(&self) -> Arc<AioQueue> {
        let queue = AioQueue::start(MirrorTarget {
            destination: self.destination.clone(),
            ledger: self.ledger.clone(),
            locks: self.locks.clone(),
            stats: self.stats.clone(),
        });
        *self.aio.lock() = Some(queue.clone());
        queue
    }

    /// Stops queueing writes for the destination (the queue's worker ends).
    pub(crate) fn detach_aio(&self) {
        self.aio.lock().take();
    }

    /// The aio queue, while an aio copy phase runs.
    pub(crate) fn aio_attached(&self) -> Option<Arc<AioQueue>> {
        self.aio.lock().clone()
    }

    /// Copies one chunk between the stores under an exclusive lock, if it
    /// is still in `from`; returns the bytes written, or `None` if there was
    /// nothing to do.
    ///
    /// The chunk is read without a lock; the lock is taken only to write it
    /// to the other store, and only if no client changed the chunk while it
    /// was read (otherwise the read is redone). Clients wait at most for
    /// one chunk write, not for a whole copy.
    pub(crate) async fn copy_chunk(
        &self,
        chunk: u64,
        from: ChunkState,
        to: ChunkState,
    ) -> Result<Option<Copied>> {
        if let Some(copied) = self.copy_chunk_in_kernel(chunk, from, to).await? {
            return Ok(copied);
        }
        let (offset, len) = self.chunks().bytes(chunk);
        let (reader, writer, side) = self.copy_direction(from);
        for attempt in 0..4 {
            if self.ledger.get(chunk) != from {
                return Ok(None);
            }
            let changes = self.ledger.changes(chunk);
            // The last attempt reads under the lock: no more retries.
            let pieces = match attempt < 3 {
                true => Some(read_range(reader, offset, len).await?),
                false => None,
            };
            let _guard = self.locks.exclusive(chunk..chunk + 1).await;
            if self.ledger.get(chunk) != from {
                return Ok(None);
            }
            let unchanged = self.ledger.changes(chunk) == changes;
            let pieces = match pieces {
                Some(_) if !unchanged => continue,
                Some(pieces) => pieces,
                None => read_range(reader, offset, len).await?,
            };
            let copied = write_pieces(writer, pieces).await?;
            if let Some(queue) = self.aio_attached() {
                queue.copied(chunk);
            }
            self.ledger.copy_landed(chunk, (from, to), side);
            return Ok(Some(copied));
        }
        unreachable!("the last attempt copies under the lock")
    }

    /// Copies a chunk between two local files inside the kernel, under the
    /// chunk's exclusive lock (nothing passes through dmm's memory, so the
    /// lock is held for about as long as a write of the chunk would be),
    /// then starts its writeback once the lock is released: a congested
    /// disk delays the copier, not the clients of the chunk. `None` when
    /// the stores are not two local files the kernel can copy between;
    /// after the first refusal the copier stops trying.
    async fn copy_chunk_in_kernel(
        &self,
        chunk: u64,
        from: ChunkState,
        to: ChunkState,
    ) -> Result<Option<Option<Copied>>> {
        if !self.kernel_copies.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let (offset, len) = self.chunks().bytes(chunk);
        let (reader, writer, side) = self.copy_direction(from);
        // Shared with the copy's blocking threads: if this future is
        // dropped (the migration stopped), the chunk stays locked until the
        // copy has ended, so that no client write to it can be overwritten.
        let guard = Arc::new(self.locks.exclusive(chunk..chunk + 1).await);
        if self.ledger.get(chunk) != from {
            return Ok(Some(None));
        }
        let Some(copied) = copy_range_in_kernel(reader, writer, (offset, len), &guard).await?
        else {
            self.kernel_copies.store(false, Ordering::Relaxed);
            return Ok(None);
        };
        if let Some(queue) = self.aio_attached() {
            queue.copied(chunk);
        }
        self.ledger.copy_landed(chunk, (from, to), side);
        drop(guard);
        start_writeback(writer, offset, len).await;
        Ok(Some(Some(copied)))
    }

    /// The bulk handles to copy a chunk in `from` with, and the side the
    /// copy writes to.
    fn copy_direction(&self, from: ChunkState) -> (&dyn BlockStore, &dyn BlockStore, Side) {
        match from == ChunkState::Destination {
            true => (&*self.bulk_destination, &*self.bulk_source, Side::Source),
            false => (
                &*self.bulk_source,
                &*self.bulk_destination,
                Side::Destination,
            ),
        }
    }

    /// Compares one `Both` chunk on the two stores; `Some(false)` on a
    /// mismatch, `None` if the chunk is not in `Both`.
    ///
    /// Reads without a lock first, so clients are not held up; only a
    /// mismatch is looked at again, under an exclusive lock.
    pub(crate) async fn verify_chunk(&self, chunk: u64) -> Result<Option<bool>> {
        if self.chunks().get(chunk) != ChunkState::Both {
            return Ok(None);
        }
        if self.same_unlocked(chunk).await? {
            return Ok(Some(true));
        }
        let _guard = self.locks.exclusive(chunk..chunk + 1).await;
        if self.chunks().get(chunk) != ChunkState::Both {
            return Ok(None);
        }
        self.digests_match(chunk, true).await.map(Some)
    }

    /// After a crash: compares one `Both` chunk and, if the stores differ,
    /// hands it to the side reads of it come from, so they keep returning
    /// what they returned since the restart. True if it was handed over.
    /// Compared without a lock first, as [`VirtualDevice::verify_chunk`]
    /// does; only a difference is looked at again, locked.
    pub(crate) async fn reconcile_chunk(&self, chunk: u64) -> Result<bool> {
        if self.chunks().get(chunk) != ChunkState::Both || self.same_unlocked(chunk).await? {
            return Ok(false);
        }
        // The gate before the chunk lock, as for client requests.
        let mode = self.gate.read().await;
        let _guard = self.locks.exclusive(chunk..chunk + 1).await;
        if self.chunks().get(chunk) != ChunkState::Both || self.digests_match(chunk, true).await? {
            return Ok(false);
        }
        let side = match mode.read_from_destination(ChunkState::Both) {
            true => ChunkState::Destination,
            false => ChunkState::Source,
        };
        Ok(self.ledger.change_state(chunk, ChunkState::Both, side))
    }

    /// Whether a chunk reads the same on both stores, without a lock: a
    /// chunk still in `Both` after both reads was not written in between
    /// (a write records leaving `Both` before its data goes out).
    async fn same_unlocked(&self, chunk: u64) -> Result<bool> {
        Ok(self.digests_match(chunk, false).await? && self.chunks().get(chunk) == ChunkState::Both)
    }

    /// Whether both stores hold the same bytes in `chunk`. `locked`: the
    /// caller holds the chunk's lock, and a remote destination's digest
    /// must be of the chunk as it is now, not one fetched ahead.
    async fn digests_match(&self, chunk: u64, locked: bool) -> Result<bool> {
        let (offset, len) = self.chunks().bytes(chunk);
        let destination = async {
            match self.remote_digests.get() {
                Some(remote) if locked => remote.now(self.chunks(), chunk).await,
                Some(remote) => remote.ahead(self.chunks(), chunk).await,
                None => digest(&*self.bulk_destination, offset, len).await,
            }
        };
        let (source, destination) =
            tokio::try_join!(digest(&*self.bulk_source, offset, len), destination)?;
        Ok(source == destination)
    }

    /// Hashes the destination's chunks through `remote` from now on.
    pub(crate) fn hash_destination_with(&self, remote: Arc<dyn crate::RemoteDigests>) {
        let _ = self.remote_digests.set(Lookahead::new(remote));
    }

    /// A client request enters: it counts as client activity from now on,
    /// and passes the gate.
    async fn enter(&self) -> Entered<'_> {
        let arrived = Instant::now();
        let active = self.clients.begin();
        let mode = self.gate.read().await;
        let waited = arrived.elapsed().as_micros() as u64;
        self.stats
            .longest_gate_wait_us
            .fetch_max(waited, Ordering::Relaxed);
        Entered {
            mode,
            _active: active,
        }
    }

    fn whole_chunk(&self, chunk: u64, offset: u64, len: u64) -> bool {
        let (start, size) = self.chunks().bytes(chunk);
        offset <= start && offset + len >= start + size
    }

    /// The plan for every chunk of a change; `frozen`, the plans of a
    /// frozen ledger.
    fn plans(
        &self,
        mode: Mode,
        (offset, len): (u64, u64),
        change: Change,
        frozen: bool,
    ) -> Vec<(u64, Plan)> {
        self.chunks()
            .span(offset, len)
            .map(|chunk| {
                let state = self.chunks().get(chunk);
                let plan = match frozen {
                    true => Plan::frozen(state, change),
                    false => mode.plan_write(state, self.whole_chunk(chunk, offset, len), change),
                };
                (chunk, plan)
            })
            .collect()
    }

    async fn change(&self, offset: u64, len: u64, payload: Payload, fua: bool) -> Result<()> {
        let mode = self.enter().await;
        let was_frozen = self.ledger.is_frozen();
        let changed = match self.aio_attached() {
            Some(queue) if *mode == Mode::AsyncMirror && !was_frozen => {
                let payload = payload.clone();
                self.change_async(&queue, (offset, len), payload, fua).await
            }
            _ => self.change_routed(*mode, offset, len, &payload, fua).await,
        };
        let changed = match changed {
            // The state directory failed during the change: it is made
            // again, this time to every store that holds each chunk.
            _ if self.ledger.is_frozen() && !was_frozen => {
                self.change_routed(*mode, offset, len, &payload, fua).await
            }
            changed => changed,
        }?;
        match fua {
            true => {
                let durable = self.make_fua_durable(changed).await;
                self.unless_destination_alone(*mode, durable).await
            }
            false => Ok(()),
        }
    }

    /// A durability wait that failed on the destination alone while the
    /// source holds every acknowledged write (`mode`) is met by the
    /// source: the client's writes are durable there. The migration learns
    /// why (its run fails and falls back to tracking writes), and the
    /// copies that waited for the destination's flush stay unrecorded, to
    /// be made again.
    async fn unless_destination_alone(&self, mode: Mode, durable: Result<()>) -> Result<()> {
        match durable {
            Err(err)
                if mode.source_is_complete()
                    && err.target() == self.destination.target()
                    && !self.ledger.is_frozen() =>
            {
                self.ledger.destination_failed(err);
                self.ledger.make_source_durable().await
            }
            other => other,
        }
    }

    /// A change routed chunk by chunk by the mode (or, if the ledger is
    /// frozen, to wherever each chunk is); true if it changed a state.
    async fn change_routed(
        &self,
        mode: Mode,
        offset: u64,
        len: u64,
        payload: &Payload,
        fua: bool,
    ) -> Result<bool> {
        let span = self.chunks().span(offset, len);
        let frozen = self.ledger.is_frozen();
        if frozen && let Some(queue) = self.aio_attached() {
            queue.taint(span.clone());
        }
        let mut guard = Arc::new(self.locks.shared(span.clone()).await);
        let mut plans = self.plans(mode, (offset, len), payload.change(), frozen);
        if plans.iter().any(|(_, plan)| plan.fill.is_some()) {
            if matches!(payload, Payload::Discard) {
                // A discard is a hint: skip chunks that would need a fill.
                plans.retain(|(_, plan)| plan.fill.is_none());
            } else {
                drop(guard);
                guard = Arc::new(self.locks.exclusive(span).await);
                plans = self.plans(mode, (offset, len), payload.change(), frozen);
                self.fill(&plans, &guard).await?;
            }
        }
        let before = self.record_transitions(&plans, Stage::BeforeData);
        let written = self.write_groups(offset, len, &plans, payload, fua).await;
        self.ledger.changed(guard.chunks());
        written?;
        let after = self.record_transitions(&plans, Stage::AfterData);
        Ok(before || after)
    }

    /// A change in asynchronous-mirroring mode: to the source, and queued
    /// for the destination where the chunk's copy is being kept up. Writes
    /// nothing if the ledger froze (the caller then routes it).
    async fn change_async(
        &self,
        queue: &AioQueue,
        (offset, len): (u64, u64),
        payload: Payload,
        fua: bool,
    ) -> Result<bool> {
        let span = self.chunks().span(offset, len);
        let _guard = self.locks.shared(span.clone()).await;
        let data = matches!(payload, Payload::Data(_));
        let mut reserved = Vec::new();
        for chunk in span.clone() {
            match queue.reserve(chunk, data) {
                Some(true) => reserved.push(chunk),
                Some(false) => {}
                None => {
                    reserved.iter().for_each(|&chunk| queue.release(chunk));
                    return Ok(false);
                }
            }
        }
        let written = payload.apply(&*self.source, offset, len, fua).await;
        self.ledger.changed(span.clone());
        if let Err(err) = written {
            reserved.iter().for_each(|&chunk| queue.release(chunk));
            return Err(err);
        }
        if let Payload::Data(bytes) = payload
            && !reserved.is_empty()
        {
            queue.push(offset, bytes, span, reserved).await;
        }
        Ok(true)
    }

    /// What a FUA write waits for: its recorded changes made durable, or,
    /// if the ledger is frozen, the chunks it could not vouch for settled.
    async fn make_fua_durable(&self, changed: bool) -> Result<()> {
        if !self.ledger.is_frozen() {
            match self.ledger.make_fua_durable(changed).await {
                Err(_) if self.ledger.is_frozen() => {}
                other => return other,
            }
        }
        self.settle_frozen(false).await
    }

    /// What a client flush waits for: both stores flushed and every
    /// recorded change durable, or, if the ledger is frozen, the chunks it
    /// could not vouch for settled and both stores flushed.
    async fn make_durable(&self) -> Result<()> {
        if !self.ledger.is_frozen() {
            match self.ledger.make_durable().await {
                Err(_) if self.ledger.is_frozen() => {}
                other => return other,
            }
        }
        self.settle_frozen(true).await
    }

    /// Copies each chunk whose record a frozen ledger could not vouch for
    /// to the store that lacks it, then flushes both stores: whatever
    /// record of it survives then routes reads to a store with every
    /// acknowledged write. `always` flushes even with nothing to settle.
    async fn settle_frozen(&self, always: bool) -> Result<()> {
        let (_settling, chunks) = self.ledger.frozen_unsettled().await;
        if chunks.is_empty() && !always {
            return Ok(());
        }
        let settled = async {
            for chunk in chunks.iter().map(u64::from) {
                match self.ledger.get(chunk) {
                    ChunkState::Both => {}
                    from => {
                        self.copy_chunk(chunk, from, ChunkState::Both).await?;
                    }
                }
            }
            tokio::try_join!(self.source.flush(), self.destination.flush()).map(|_| ())
        };
        let settled = settled.await;
        if settled.is_err() {
            self.ledger.still_unsettled(chunks);
        }
        settled
    }

    /// Makes partially written chunks whole on the side that will hold
    /// them, durably, before their state changes.
    async fn fill(&self, plans: &[(u64, Plan)], guard: &Arc<ChunkGuard>) -> Result<()> {
        for &(chunk, plan) in plans {
            let (from, to, side) = match plan.fill {
                Some(Fill::FromSource) => {
                    (&self.bulk_source, &self.bulk_destination, Side::Destination)
                }
                Some(Fill::FromDestination) => {
                    (&self.bulk_destination, &self.bulk_source, Side::Source)
                }
                None => continue,
            };
            self.fill_chunk(from, to, chunk, guard).await?;
            // Like a copy, the fill becomes durable with the next flush;
            // the state change that relies on it waits until then.
            self.ledger.copied(chunk, side);
        }
        Ok(())
    }

    /// Copies one chunk for a fill, inside the kernel where it can: a
    /// client write waits for its fill, and a kernel copy neither reads the
    /// chunk into memory nor scans it for zeroes.
    ///
    /// The fill runs in a task of its own that holds the chunk's lock until
    /// it ends: a request dropped mid-fill (its connection gone) must not
    /// let a later write land before the fill's last bytes do.
    async fn fill_chunk(
        &self,
        from: &Arc<dyn BlockStore>,
        to: &Arc<dyn BlockStore>,
        chunk: u64,
        guard: &Arc<ChunkGuard>,
    ) -> Result<()> {
        let (offset, len) = self.chunks().bytes(chunk);
        let (from, to, hold) = (from.clone(), to.clone(), guard.clone());
        let in_kernel = self.kernel_copies.load(Ordering::Relaxed);
        let filled = tokio::spawn(async move {
            if in_kernel
                && copy_range_in_kernel(&*from, &*to, (offset, len), &hold)
                    .await?
                    .is_some()
            {
                return Ok(true);
            }
            copy_range(&*from, &*to, offset, len).await.map(|_| false)
        })
        .await
        .map_err(|e| {
            let err = std::io::Error::other(e);
            Error::io(Op::Copy, self.target.as_str(), err).at(offset, len)
        })?;
        if in_kernel && !filled? {
            self.kernel_copies.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Records the state changes of a write that belong to `stage`; true if
    /// any was made. A change the ledger refuses because it froze is left
    /// to the caller (it writes the change again, frozen).
    ///
    /// A chunk leaving `Both` (or just filled) is recorded before the data
    /// goes out: its new home already holds its current bytes, so the
    /// record never claims more than is there. A chunk whose new home gets
    /// its bytes only from this (whole-chunk) write is recorded after.
    fn record_transitions(&self, plans: &[(u64, Plan)], stage: Stage) -> bool {
        let mut changed = false;
        for &(chunk, plan) in plans {
            let Some((from, to)) = plan.transition else {
                continue;
            };
            let early = from == ChunkState::Both || plan.fill.is_some();
            if early == (stage == Stage::BeforeData) {
                changed |= self.ledger.change_state(chunk, from, to);
            }
        }
        changed
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
            let first = self.chunks().bytes(plans[i].0).0.max(offset);
            let last = self.chunks().bytes(plans[j - 1].0);
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
            // Unless the ledger is frozen: they cannot be, and it fails.
            for &(chunk, _) in chunks {
                let dirtied = self
                    .ledger
                    .change_state(chunk, ChunkState::Both, ChunkState::Source);
                if !dirtied && self.ledger.is_frozen() {
                    return Err(err);
                }
            }
            self.ledger.destination_failed(err);
        }
        Ok(())
    }

    /// Reads from wherever each run of chunks is current.
    async fn routed<T, F>(&self, offset: u64, len: u64, mut run: F) -> Result<Vec<T>>
    where
        F: AsyncRun<T>,
    {
        let mode = self.enter().await;
        let _guard = self.locks.shared(self.chunks().span(offset, len)).await;
        let end = offset + len;
        let mut results = Vec::new();
        let mut chunk_iter = self.chunks().span(offset, len).peekable();
        while let Some(first) = chunk_iter.next() {
            let from_destination = mode.read_from_destination(self.chunks().get(first));
            let mut last = first;
            while let Some(&next) = chunk_iter.peek() {
                if mode.read_from_destination(self.chunks().get(next)) != from_destination {
                    break;
                }
                last = next;
                chunk_iter.next();
            }
            let start = self.chunks().bytes(first).0.max(offset);
            let (last_offset, last_len) = self.chunks().bytes(last);
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

/// A client request past the gate: the routing mode it holds, and its
/// place among the requests in flight.
struct Entered<'a> {
    mode: tokio::sync::RwLockReadGuard<'a, Mode>,
    _active: Active<'a>,
}

impl std::ops::Deref for Entered<'_> {
    type Target = Mode;

    fn deref(&self) -> &Mode {
        &self.mode
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
        whole_extents(store, offset, len).await
    }
}

/// The allocation map of the whole range (a store may answer in several
/// calls).
pub(crate) async fn whole_extents(
    store: &dyn BlockStore,
    offset: u64,
    len: u64,
) -> Result<Vec<Extent>> {
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
#[async_trait]
impl BlockStore for VirtualDevice {
    fn target(&self) -> &str {
        &self.target
    }

    fn size(&self) -> u64 {
        self.chunks().volume_size()
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
        let mode = self.enter().await;
        let durable = self.make_durable().await;
        self.unless_destination_alone(*mode, durable).await
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
