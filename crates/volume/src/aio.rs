//! Asynchronous mirroring: client writes to copied chunks are acknowledged
//! once on the source, and the same writes are queued for the destination.
//!
//! A chunk written this way is dirty (in `Source`) until every queued write
//! to it has landed; then, unless something else changed it on the source
//! alone (a discard, a write while nothing was queued), it is clean again
//! without being copied. All of that is decided under one lock, so a write
//! can never slip between "the last queued write landed" and "the chunk is
//! clean". Queued writes land in the order they were made; the queue is
//! bounded in bytes, so a slow destination slows clients down instead of
//! filling memory.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dmm_store::BlockStore;
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::chunks::ChunkState;
use crate::ledger::{Ledger, Side};
use crate::locks::ChunkLocks;
use crate::progress::ClientStats;

/// Queued bytes at most (in KiB permits).
const BUDGET_KIB: usize = 64 * 1024;

struct Entry {
    offset: u64,
    data: Bytes,
    /// The chunks the write touches (locked while it is applied).
    span: Range<u64>,
    /// The chunks whose reservation this write carries.
    reserved: Vec<u64>,
    _budget: OwnedSemaphorePermit,
}

/// What the queue knows per chunk, beyond its state in the ledger.
#[derive(Default)]
struct Pending {
    /// Queued (or reserved) destination writes per chunk.
    writes: HashMap<u64, u32>,
    /// Chunks changed on the source without a queued copy of the change.
    tainted: HashSet<u64>,
}

/// Where the queue's writes go, and what they take part in: the chunk
/// locks client writes take, the ledger whose states they settle, the
/// counters of destination bytes.
pub struct MirrorTarget {
    pub destination: Arc<dyn BlockStore>,
    pub ledger: Arc<Ledger>,
    pub locks: Arc<ChunkLocks>,
    pub stats: Arc<ClientStats>,
}

/// The queue of destination writes, and its worker.
pub struct AioQueue {
    ledger: Arc<Ledger>,
    book: Mutex<Pending>,
    sender: mpsc::UnboundedSender<Entry>,
    budget: Arc<Semaphore>,
    queued: AtomicUsize,
    drained: Notify,
}

impl AioQueue {
    /// Starts the worker that applies queued writes to the target's
    /// destination. It stops when the queue is dropped (detached from the
    /// device).
    pub fn start(target: MirrorTarget) -> Arc<AioQueue> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let queue = Arc::new(AioQueue {
            ledger: target.ledger.clone(),
            book: Mutex::new(Pending::default()),
            sender,
            budget: Arc::new(Semaphore::new(BUDGET_KIB)),
            queued: AtomicUsize::new(0),
            drained: Notify::new(),
        });
        let worker = Arc::downgrade(&queue);
        tokio::spawn(apply(target, worker, receiver));
        queue
    }

    /// Decides, under the write's shared chunk lock and before the source
    /// write, whether this write's change to `chunk` will be queued for
    /// the destination; a clean chunk becomes dirty (journaled). `None` if
    /// the ledger is frozen: the write then goes to both stores itself.
    pub fn reserve(&self, chunk: u64, queue: bool) -> Option<bool> {
        let mut book = self.book.lock();
        let pending = book.writes.get(&chunk).copied().unwrap_or(0);
        let state = self.ledger.get(chunk);
        if state == ChunkState::Both
            && !self
                .ledger
                .change_state(chunk, ChunkState::Both, ChunkState::Source)
        {
            return None;
        }
        let queued = queue && (state == ChunkState::Both || pending > 0);
        if queued {
            *book.writes.entry(chunk).or_default() += 1;
        } else {
            book.tainted.insert(chunk);
        }
        Some(queued)
    }

    /// A write went to the source without the queue (the ledger is
    /// frozen): the chunks' queued writes no longer make them clean.
    pub fn taint(&self, chunks: Range<u64>) {
        self.book.lock().tainted.extend(chunks);
    }

    /// Gives back a reservation whose source write failed.
    pub fn release(&self, chunk: u64) {
        let mut book = self.book.lock();
        book.tainted.insert(chunk);
        Self::landed(&mut book, chunk);
    }

    fn landed(book: &mut Pending, chunk: u64) -> bool {
        match book.writes.get_mut(&chunk) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                book.writes.remove(&chunk);
                true
            }
            None => false,
        }
    }

    /// Queues a write that has landed on the source, carrying the
    /// reservations made for it.
    pub async fn push(&self, offset: u64, data: Bytes, span: Range<u64>, reserved: Vec<u64>) {
        let kib = (data.len() / 1024).clamp(1, BUDGET_KIB) as u32;
        let budget = self
            .budget
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("the budget is never closed");
        self.queued.fetch_add(1, Ordering::AcqRel);
        let entry = Entry {
            offset,
            data,
            span,
            reserved,
            _budget: budget,
        };
        if self.sender.send(entry).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The copier made the chunk equal on both stores.
    pub fn copied(&self, chunk: u64) {
        self.book.lock().tainted.remove(&chunk);
    }

    /// Waits until every queued write has landed.
    pub async fn drained(&self) {
        loop {
            let wake = self.drained.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if self.queued.load(Ordering::Acquire) == 0 {
                return;
            }
            wake.await;
        }
    }

    fn finish(&self, entry: &Entry, landed: bool) {
        {
            let mut book = self.book.lock();
            for &chunk in &entry.reserved {
                if !landed {
                    book.tainted.insert(chunk);
                }
                if Self::landed(&mut book, chunk) && !book.tainted.contains(&chunk) {
                    // Not journaled: like a copy, it is made durable by the
                    // next checkpoint, and redone after a crash.
                    let copy = (ChunkState::Source, ChunkState::Both);
                    self.ledger.copy_landed(chunk, copy, Side::Destination);
                }
            }
        }
        if self.queued.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }
}

async fn apply(
    target: MirrorTarget,
    queue: std::sync::Weak<AioQueue>,
    mut receiver: mpsc::UnboundedReceiver<Entry>,
) {
    while let Some(entry) = receiver.recv().await {
        let Some(queue) = queue.upgrade() else {
            return;
        };
        let landed = land(&target, &entry).await;
        queue.finish(&entry, landed);
    }
}

/// Writes one queued entry to the destination under its chunks' shared
/// locks; false if the destination refused it (the failure is recorded).
async fn land(target: &MirrorTarget, entry: &Entry) -> bool {
    let _guard = target.locks.shared(entry.span.clone()).await;
    let written = target
        .destination
        .write(entry.offset, entry.data.clone(), false)
        .await;
    target
        .stats
        .destination_bytes
        .fetch_add(entry.data.len() as u64, Ordering::Relaxed);
    match written {
        Ok(()) => true,
        Err(err) => {
            target.ledger.destination_failed(err);
            false
        }
    }
}
