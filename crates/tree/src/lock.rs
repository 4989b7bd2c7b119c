//! Locks that know their place in the lock order.
//!
//! A tree migration is served by many threads at once (FUSE threads,
//! directory and file workers, the flusher, the daemon asking for
//! progress), and a thread that takes two locks in the wrong order, or one
//! it already holds, hangs every client of the access point. So every lock
//! of the engine has a [`Rank`], and a thread may only take a lock ranked
//! strictly below every lock it already holds (`DESIGN.md`, "Lock order",
//! says why each rank is where it is). Debug builds (every test) check it on
//! each acquisition and panic with both names instead of hanging; release
//! builds compile the check away.
//!
//! The journal's own lock lives in another crate: [`enter`] marks the span
//! of a journal call so that the same check covers it.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

/// Where a lock sits in the order: a thread holding a lock may only take
/// locks of a later rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Rank {
    /// `access::nodes`: renames exclude reopening inodes by name.
    Renames,
    /// `namespace`: populations that place hard-linked files.
    Linking,
    /// `worker`: one worker at a time decides the copy is finished.
    Settling,
    /// `namespace`: journal flushes, one batch at a time.
    Flushing,
    /// The journal's SQLite connection (`journal`; the lock is inside
    /// `dmm-catalog`'s `Database`).
    Journal,
    /// `namespace`: the in-memory state.
    State,
    /// `access::nodes`: the known inodes.
    Nodes,
    /// `access::nodes`: the open descriptors.
    Descriptors,
    /// `access::files` and `access::fs`: open files and directories.
    Handles,
    /// `access::iomode`: how each open inode is served.
    IoModes,
    /// `worker`: the rate limiter.
    Limiter,
}

#[cfg(debug_assertions)]
mod held {
    use std::cell::Cell;

    use super::Rank;

    thread_local! {
        /// Bit `r` is set while this thread holds a lock of rank `r`.
        static HELD: Cell<u32> = const { Cell::new(0) };
    }

    pub(super) fn take(rank: Rank) {
        HELD.with(|held| {
            let mask = held.get();
            let bit = 1u32 << rank as u32;
            if mask >= bit {
                let highest = Rank::ALL
                    .iter()
                    .rev()
                    .find(|r| mask & (1 << **r as u32) != 0)
                    .expect("a bit is set");
                panic!("lock order violated: taking {rank:?} while holding {highest:?}");
            }
            held.set(mask | bit);
        });
    }

    pub(super) fn release(rank: Rank) {
        HELD.with(|held| held.set(held.get() & !(1u32 << rank as u32)));
    }

    pub(super) fn only(rank: Rank) {
        HELD.with(|held| {
            let others = held.get() & !(1u32 << rank as u32);
            assert!(
                others == 0,
                "waiting on another thread while holding locks besides {rank:?} (mask {others:#b})"
            );
        });
    }
}

#[cfg(debug_assertions)]
impl Rank {
    const ALL: [Rank; 11] = [
        Rank::Renames,
        Rank::Linking,
        Rank::Settling,
        Rank::Flushing,
        Rank::Journal,
        Rank::State,
        Rank::Nodes,
        Rank::Descriptors,
        Rank::Handles,
        Rank::IoModes,
        Rank::Limiter,
    ];
}

/// Proof that the order was checked for `rank`; clears the mark on drop.
struct Held(#[cfg(debug_assertions)] Rank);

impl Held {
    fn take(#[allow(unused_variables)] rank: Rank) -> Held {
        #[cfg(debug_assertions)]
        held::take(rank);
        Held(
            #[cfg(debug_assertions)]
            rank,
        )
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        held::release(self.0);
    }
}

/// Marks a call into something that takes the lock of `rank` itself (the
/// journal): checked like an acquisition, released when the value drops.
#[must_use]
pub(crate) fn enter(rank: Rank) -> impl Drop {
    Held::take(rank)
}

/// Checks that the calling thread holds no lock but the one of `rank`: it
/// is about to wait (releasing that one) for another thread, which may need
/// any other lock.
fn check_only(#[allow(unused_variables)] rank: Rank) {
    #[cfg(debug_assertions)]
    held::only(rank);
}

/// A mutex with a rank.
#[derive(Debug)]
pub(crate) struct Mutex<T> {
    rank: Rank,
    inner: parking_lot::Mutex<T>,
}

/// A held [`Mutex`].
pub(crate) struct MutexGuard<'a, T> {
    inner: parking_lot::MutexGuard<'a, T>,
    rank: Rank,
    _held: Held,
}

impl<T> Mutex<T> {
    pub(crate) fn new(rank: Rank, value: T) -> Mutex<T> {
        Mutex {
            rank,
            inner: parking_lot::Mutex::new(value),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        let held = Held::take(self.rank);
        MutexGuard {
            inner: self.inner.lock(),
            rank: self.rank,
            _held: held,
        }
    }
}

impl<T> MutexGuard<'_, T> {
    /// Waits on `condvar` (releasing the lock meanwhile) until notified or
    /// `timeout` passes. Callers loop on their condition: every wait is
    /// bounded, so a lost notification costs a timeout, never a hang.
    pub(crate) fn wait_for(&mut self, condvar: &parking_lot::Condvar, timeout: Duration) {
        check_only(self.rank);
        condvar.wait_for(&mut self.inner, timeout);
    }
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

/// A reader-writer lock with a rank.
#[derive(Debug)]
pub(crate) struct RwLock<T> {
    rank: Rank,
    inner: parking_lot::RwLock<T>,
}

/// A held [`RwLock`], shared or exclusive.
pub(crate) struct RwLockGuard<G> {
    _inner: G,
    _held: Held,
}

impl<T> RwLock<T> {
    pub(crate) fn new(rank: Rank, value: T) -> RwLock<T> {
        RwLock {
            rank,
            inner: parking_lot::RwLock::new(value),
        }
    }

    pub(crate) fn read(&self) -> RwLockGuard<parking_lot::RwLockReadGuard<'_, T>> {
        let held = Held::take(self.rank);
        RwLockGuard {
            _inner: self.inner.read(),
            _held: held,
        }
    }

    pub(crate) fn write(&self) -> RwLockGuard<parking_lot::RwLockWriteGuard<'_, T>> {
        let held = Held::take(self.rank);
        RwLockGuard {
            _inner: self.inner.write(),
            _held: held,
        }
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    #[test]
    fn locks_taken_in_rank_order_are_fine() {
        let outer = Mutex::new(Rank::Flushing, ());
        let inner = Mutex::new(Rank::State, ());
        let _a = outer.lock();
        let _b = inner.lock();
        let _journal = enter(Rank::Nodes);
    }

    #[test]
    #[should_panic(expected = "taking State while holding State")]
    fn taking_a_held_lock_again_panics_instead_of_hanging() {
        let state = Mutex::new(Rank::State, ());
        let _a = state.lock();
        let _b = state.lock();
    }

    #[test]
    #[should_panic(expected = "taking Journal while holding State")]
    fn a_journal_call_under_the_state_lock_panics() {
        let state = Mutex::new(Rank::State, ());
        let _a = state.lock();
        let _journal = enter(Rank::Journal);
    }

    #[test]
    #[should_panic(expected = "waiting on another thread while holding locks besides State")]
    fn waiting_while_holding_another_lock_panics() {
        let flushing = Mutex::new(Rank::Flushing, ());
        let state = Mutex::new(Rank::State, ());
        let condvar = parking_lot::Condvar::new();
        let _a = flushing.lock();
        let mut b = state.lock();
        b.wait_for(&condvar, Duration::from_millis(1));
    }

    #[test]
    fn a_released_lock_can_be_taken_again() {
        let state = Mutex::new(Rank::State, ());
        drop(state.lock());
        let flushing = Mutex::new(Rank::Flushing, ());
        let _a = flushing.lock();
        let _b = state.lock();
    }
}
