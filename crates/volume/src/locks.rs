//! Range locks over chunks, so that a client write and a copy never race on
//! a chunk.
//!
//! Client I/O takes shared locks on the chunks it touches (clients may
//! overlap each other; ordering between them is theirs to keep). The copier,
//! a verification and any write that must first fill a chunk take exclusive
//! locks. A waiting exclusive locker holds back new shared lockers so a hot
//! chunk cannot starve the copier. Ranges are always locked in ascending
//! chunk order, which rules out deadlock. Only chunks that are locked or
//! awaited have an entry in the table, so a large volume costs nothing.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
struct Slot {
    shared: u32,
    exclusive: bool,
    exclusive_waiting: u32,
    wake: Arc<Notify>,
}

impl Slot {
    fn idle(&self) -> bool {
        self.shared == 0 && !self.exclusive && self.exclusive_waiting == 0
    }
}

/// The lock table.
#[derive(Default)]
pub struct ChunkLocks {
    slots: Mutex<HashMap<u64, Slot>>,
}

/// Locks held on a range of chunks; released when dropped.
pub struct ChunkGuard {
    locks: Arc<ChunkLocks>,
    chunks: Range<u64>,
    exclusive: bool,
}

impl ChunkGuard {
    pub fn chunks(&self) -> Range<u64> {
        self.chunks.clone()
    }
}

impl ChunkLocks {
    pub fn new() -> Arc<ChunkLocks> {
        Arc::new(ChunkLocks::default())
    }

    /// Locks `chunks` shared.
    pub async fn shared(self: &Arc<Self>, chunks: Range<u64>) -> ChunkGuard {
        self.lock(chunks, false).await
    }

    /// Locks `chunks` exclusively.
    pub async fn exclusive(self: &Arc<Self>, chunks: Range<u64>) -> ChunkGuard {
        self.lock(chunks, true).await
    }

    async fn lock(self: &Arc<Self>, chunks: Range<u64>, exclusive: bool) -> ChunkGuard {
        // Build the guard first: if this future is dropped half-way, the
        // guard releases exactly the chunks taken so far.
        let mut guard = ChunkGuard {
            locks: self.clone(),
            chunks: chunks.start..chunks.start,
            exclusive,
        };
        for chunk in chunks {
            self.lock_one(chunk, exclusive).await;
            guard.chunks.end = chunk + 1;
        }
        guard
    }

    async fn lock_one(&self, chunk: u64, exclusive: bool) {
        let mut announced = false;
        loop {
            let wake = {
                let mut slots = self.slots.lock();
                let slot = slots.entry(chunk).or_default();
                let free = if exclusive {
                    slot.shared == 0 && !slot.exclusive
                } else {
                    !slot.exclusive && slot.exclusive_waiting == 0
                };
                if free {
                    if exclusive {
                        slot.exclusive = true;
                        if announced {
                            slot.exclusive_waiting -= 1;
                        }
                    } else {
                        slot.shared += 1;
                    }
                    return;
                }
                if exclusive && !announced {
                    slot.exclusive_waiting += 1;
                    announced = true;
                }
                slot.wake.clone()
            };
            let waiting = wake.notified();
            tokio::pin!(waiting);
            waiting.as_mut().enable();
            // Re-check under the lock after enabling, so a release between
            // dropping the table lock and enabling is not missed.
            if self.could_take(chunk, exclusive) {
                continue;
            }
            let withdraw = WithdrawOnDrop {
                locks: self,
                chunk,
                armed: exclusive && announced,
            };
            waiting.await;
            std::mem::forget(withdraw);
        }
    }

    fn could_take(&self, chunk: u64, exclusive: bool) -> bool {
        let slots = self.slots.lock();
        slots.get(&chunk).is_none_or(|slot| {
            if exclusive {
                slot.shared == 0 && !slot.exclusive
            } else {
                !slot.exclusive && slot.exclusive_waiting == 0
            }
        })
    }

    fn release(&self, chunks: Range<u64>, exclusive: bool) {
        let mut slots = self.slots.lock();
        for chunk in chunks {
            let Some(slot) = slots.get_mut(&chunk) else {
                continue;
            };
            if exclusive {
                slot.exclusive = false;
            } else {
                slot.shared -= 1;
            }
            slot.wake.notify_waiters();
            if slot.idle() {
                slots.remove(&chunk);
            }
        }
    }

    /// Chunks with an entry (locked or awaited), for tests.
    #[cfg(test)]
    pub fn busy(&self) -> usize {
        self.slots.lock().len()
    }
}

/// Takes back an exclusive waiter's announcement if its wait is abandoned.
struct WithdrawOnDrop<'a> {
    locks: &'a ChunkLocks,
    chunk: u64,
    armed: bool,
}

impl Drop for WithdrawOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut slots = self.locks.slots.lock();
        if let Some(slot) = slots.get_mut(&self.chunk) {
            slot.exclusive_waiting -= 1;
            slot.wake.notify_waiters();
            if slot.idle() {
                slots.remove(&self.chunk);
            }
        }
    }
}

impl Drop for ChunkGuard {
    fn drop(&mut self) {
        self.locks.release(self.chunks.clone(), self.exclusive);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn shared_locks_coexist_and_exclusive_waits() {
        let locks = ChunkLocks::new();
        let a = locks.shared(0..3).await;
        let b = locks.shared(1..2).await;
        let exclusive = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.exclusive(1..2).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!exclusive.is_finished());
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!exclusive.is_finished());
        drop(b);
        let guard = tokio::time::timeout(Duration::from_secs(1), exclusive)
            .await
            .expect("exclusive lock granted")
            .unwrap();
        drop(guard);
        assert_eq!(locks.busy(), 0);
    }

    #[tokio::test]
    async fn a_waiting_exclusive_holds_back_new_shared() {
        let locks = ChunkLocks::new();
        let first = locks.shared(5..6).await;
        let exclusive = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.exclusive(5..6).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let late = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.shared(5..6).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!late.is_finished(), "new shared must wait behind exclusive");
        drop(first);
        let guard = exclusive.await.unwrap();
        assert!(!late.is_finished());
        drop(guard);
        drop(late.await.unwrap());
        assert_eq!(locks.busy(), 0);
    }

    #[tokio::test]
    async fn abandoned_waits_leave_no_trace() {
        let locks = ChunkLocks::new();
        let held = locks.exclusive(0..1).await;
        let attempt = tokio::time::timeout(Duration::from_millis(20), locks.exclusive(0..2)).await;
        assert!(attempt.is_err());
        drop(held);
        assert_eq!(locks.busy(), 0);
        let _again = locks.exclusive(0..2).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exclusive_sections_never_overlap() {
        let locks = ChunkLocks::new();
        let inside = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (locks, inside) = (locks.clone(), inside.clone());
                tokio::spawn(async move {
                    for _ in 0..50 {
                        if i % 4 == 0 {
                            let _g = locks.exclusive(2..4).await;
                            assert_eq!(inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0);
                            tokio::task::yield_now().await;
                            inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        } else {
                            let _g = locks.shared(i % 5..i % 5 + 2).await;
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(locks.busy(), 0);
    }
}
