//! How the kernel serves each open regular file: through dmm (every read
//! and write a FUSE request, so the migration's hooks run first), or
//! straight from the target file (FUSE passthrough, Linux 6.9 and later:
//! reads, writes and mappings never reach dmm, and run at the target's
//! speed).
//!
//! A file with all its data in the target needs no hook to be read, so a
//! read-only open of one is passed through; a file the migration does not
//! track (a client made it) needs no hook at all, so every open of it is.
//! Only files of [`PASSTHROUGH_FROM`] bytes or more, though: a small file
//! is read in a request or two, kept in the FUSE page cache across opens,
//! while registering a backing file costs an open and two ioctls, and the
//! kernel asks for the attributes again after every read passed through
//! (its atime moved).
//! The kernel's rules, which dmm must follow or the client's open fails
//! with EIO:
//!
//! - an inode is in one mode at a time: while one open of it is passed
//!   through, every other open must be too, with the same backing file;
//!   while one is served through dmm, none may be passed through;
//! - a passed-through open does not keep the FUSE page cache.
//!
//! So the first open of an inode decides its mode, kept until its last
//! release. An open for writing of a tracked file that is passed through
//! is passed through too (the kernel leaves no choice): the file is marked
//! changed at the open, since dmm will not see its writes. Those writes
//! bypass the FUSE page cache, so the first open served through dmm after
//! them drops that cache instead of keeping it.
//!
//! Passthrough needs the kernel's support, CAP_SYS_ADMIN and a target on a
//! file system that is not itself stacked; when the kernel lacks it or the
//! first backing file cannot be registered, every open is served through
//! dmm, and the log says why once.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fuser::BackingId;

use crate::lock::{Mutex, Rank};

/// The smallest file passed through: up to this size a file is read in
/// one or two requests, which the kept page cache then spares, so passing
/// it through would save nothing and cost a backing file per open.
pub(super) const PASSTHROUGH_FROM: u64 = 1 << 20;

/// What an open needs from the migration.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wants {
    /// The open may write.
    pub(super) writable: bool,
    /// The migration tracks the file (changes to it are journaled).
    pub(super) tracked: bool,
    /// All the file's data is in the target.
    pub(super) complete: bool,
    /// The file has [`PASSTHROUGH_FROM`] bytes or more.
    pub(super) large: bool,
}

/// How one open is served (`B`: a registered backing file).
pub(super) enum Serving<B = BackingId> {
    /// Through dmm; `keep_cache` unless the FUSE page cache may hold bytes
    /// older than writes passed through since it was filled.
    Served { keep_cache: bool },
    /// By the kernel from this backing file; `mark_changed` when the open
    /// may write a tracked file dmm will not see the writes of.
    Passthrough { backing: Arc<B>, mark_changed: bool },
}

/// The mode of an inode with open files, as dmm last decided it.
enum Inode<B> {
    Served {
        opens: u32,
    },
    Passthrough {
        opens: u32,
        backing: Arc<B>,
        written: bool,
    },
    /// No open file, but the page cache may hold bytes older than writes
    /// passed through. (Only tracked files have both: a file the
    /// migration does not track is always passed through while
    /// passthrough is on, and never again once it is off.)
    Stale,
}

/// The modes of the inodes with open regular files.
pub(super) struct IoModes<B = BackingId> {
    inodes: Mutex<HashMap<u64, Inode<B>>>,
    enabled: AtomicBool,
    passed_through: AtomicU64,
}

impl<B> IoModes<B> {
    /// Passthrough stays off until [`IoModes::enable`].
    pub(super) fn new() -> IoModes<B> {
        IoModes {
            inodes: Mutex::new(Rank::IoModes, HashMap::new()),
            enabled: AtomicBool::new(false),
            passed_through: AtomicU64::new(0),
        }
    }

    /// The kernel agreed to pass files through.
    pub(super) fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Opens passed through so far.
    pub(super) fn passed_through(&self) -> u64 {
        self.passed_through.load(Ordering::Relaxed)
    }

    /// Decides how an open of target inode `ino` is served, and counts it.
    /// `register` makes the backing file when the inode enters passthrough;
    /// if it fails, passthrough is switched off for good.
    pub(super) fn open(
        &self,
        ino: u64,
        wants: Wants,
        register: impl FnOnce() -> io::Result<B>,
    ) -> Serving<B> {
        let mut inodes = self.inodes.lock();
        let mode = match inodes.get_mut(&ino) {
            Some(Inode::Passthrough {
                opens,
                backing,
                written,
            }) => {
                *opens += 1;
                *written |= wants.writable && wants.tracked;
                Serving::Passthrough {
                    backing: backing.clone(),
                    mark_changed: wants.writable && wants.tracked,
                }
            }
            Some(Inode::Served { opens }) => {
                *opens += 1;
                Serving::Served { keep_cache: true }
            }
            stale_or_none => {
                let stale = stale_or_none.is_some();
                let entered = self.enter(wants, register);
                let serving = match &entered {
                    Inode::Passthrough { backing, .. } => Serving::Passthrough {
                        backing: backing.clone(),
                        mark_changed: false,
                    },
                    _ => Serving::Served { keep_cache: !stale },
                };
                inodes.insert(ino, entered);
                serving
            }
        };
        self.counted(mode)
    }

    fn counted(&self, mode: Serving<B>) -> Serving<B> {
        if matches!(mode, Serving::Passthrough { .. }) {
            self.passed_through.fetch_add(1, Ordering::Relaxed);
        }
        mode
    }

    /// The mode of an inode with no open file, for its first open: passed
    /// through if passthrough is on, the file large, and the open needs no
    /// hook (a complete file read, or a file the migration does not track).
    fn enter(&self, wants: Wants, register: impl FnOnce() -> io::Result<B>) -> Inode<B> {
        let hookless = !wants.tracked || (wants.complete && !wants.writable);
        if !hookless || !wants.large || !self.enabled.load(Ordering::Relaxed) {
            return Inode::Served { opens: 1 };
        }
        match register() {
            // Not yet written through: a tracked file enters only to be read.
            Ok(backing) => Inode::Passthrough {
                opens: 1,
                backing: Arc::new(backing),
                written: false,
            },
            Err(err) => {
                if self.enabled.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "FUSE passthrough is off for this access point: cannot register a \
                         backing file ({err}); every read and write goes through dmm"
                    );
                }
                Inode::Served { opens: 1 }
            }
        }
    }

    /// The kernel forgot target inode `ino`, and its page cache with it.
    pub(super) fn forget(&self, ino: u64) {
        let mut inodes = self.inodes.lock();
        if matches!(inodes.get(&ino), Some(Inode::Stale)) {
            inodes.remove(&ino);
        }
    }

    /// An open of target inode `ino` was released (or its open failed
    /// after [`IoModes::open`] counted it).
    pub(super) fn release(&self, ino: u64) {
        let mut inodes = self.inodes.lock();
        let Some(inode) = inodes.get_mut(&ino) else {
            return;
        };
        let last = match inode {
            Inode::Served { opens } | Inode::Passthrough { opens, .. } => {
                *opens = opens.saturating_sub(1);
                *opens == 0
            }
            Inode::Stale => false,
        };
        if last {
            match inode {
                Inode::Passthrough { written: true, .. } => *inode = Inode::Stale,
                _ => {
                    inodes.remove(&ino);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ_COMPLETE: Wants = Wants {
        writable: false,
        tracked: true,
        complete: true,
        large: true,
    };
    const WRITE_COMPLETE: Wants = Wants {
        writable: true,
        ..READ_COMPLETE
    };
    const READ_PENDING: Wants = Wants {
        complete: false,
        ..READ_COMPLETE
    };
    const WRITE_NEW: Wants = Wants {
        writable: true,
        tracked: false,
        ..READ_COMPLETE
    };
    const READ_SMALL: Wants = Wants {
        large: false,
        ..READ_COMPLETE
    };

    fn modes() -> IoModes<u32> {
        let modes = IoModes::new();
        modes.enable();
        modes
    }

    /// "passthrough N", "passthrough N, mark changed", "served",
    /// "served, cache dropped".
    fn open(modes: &IoModes<u32>, ino: u64, wants: Wants, backing: u32) -> String {
        match modes.open(ino, wants, || Ok(backing)) {
            Serving::Passthrough {
                backing,
                mark_changed: false,
            } => format!("passthrough {backing}"),
            Serving::Passthrough { backing, .. } => format!("passthrough {backing}, mark changed"),
            Serving::Served { keep_cache: true } => "served".into(),
            Serving::Served { keep_cache: false } => "served, cache dropped".into(),
        }
    }

    #[test]
    fn the_first_open_decides_and_every_other_open_follows_until_the_last_release() {
        let modes = modes();
        assert_eq!(open(&modes, 7, READ_COMPLETE, 1), "passthrough 1");
        assert_eq!(open(&modes, 7, READ_PENDING, 2), "passthrough 1");
        assert_eq!(
            open(&modes, 7, WRITE_COMPLETE, 3),
            "passthrough 1, mark changed"
        );
        modes.release(7);
        modes.release(7);
        assert_eq!(open(&modes, 7, READ_COMPLETE, 4), "passthrough 1");
        modes.release(7);
        modes.release(7);
        // Written through passthrough: the page cache may be older.
        assert_eq!(open(&modes, 7, WRITE_COMPLETE, 5), "served, cache dropped");
        assert_eq!(open(&modes, 7, READ_COMPLETE, 6), "served");
        modes.release(7);
        modes.release(7);
        assert_eq!(open(&modes, 7, READ_COMPLETE, 8), "passthrough 8");
        assert_eq!(modes.passed_through(), 5);
    }

    #[test]
    fn files_with_hooks_to_run_are_served_and_keep_their_inode_served() {
        let modes = modes();
        assert_eq!(open(&modes, 1, READ_PENDING, 1), "served");
        assert_eq!(open(&modes, 1, READ_COMPLETE, 2), "served");
        assert_eq!(open(&modes, 2, WRITE_COMPLETE, 3), "served");
        assert_eq!(open(&modes, 3, READ_SMALL, 4), "served");
        modes.release(1);
        modes.release(1);
        assert_eq!(open(&modes, 1, READ_COMPLETE, 4), "passthrough 4");
        assert_eq!(modes.passed_through(), 1);
    }

    #[test]
    fn untracked_files_are_passed_through_and_leave_no_stale_cache() {
        let modes = modes();
        assert_eq!(open(&modes, 3, WRITE_NEW, 1), "passthrough 1");
        modes.release(3);
        assert!(modes.inodes.lock().is_empty());
    }

    #[test]
    fn a_forgotten_inode_has_no_stale_cache_left() {
        let modes = modes();
        open(&modes, 4, READ_COMPLETE, 1);
        open(&modes, 4, WRITE_COMPLETE, 1);
        modes.release(4);
        modes.release(4);
        modes.forget(4);
        assert_eq!(open(&modes, 4, WRITE_COMPLETE, 2), "served");
    }

    #[test]
    fn a_backing_file_refused_switches_passthrough_off_for_good() {
        let modes = modes();
        let refused = modes.open(5, READ_COMPLETE, || Err(io::Error::other("no")));
        assert!(matches!(refused, Serving::Served { keep_cache: true }));
        let unasked = modes.open(6, READ_COMPLETE, || panic!("not asked again"));
        assert!(matches!(unasked, Serving::Served { .. }));
        assert_eq!(modes.passed_through(), 0);
    }

    #[test]
    fn nothing_is_passed_through_before_the_kernel_agrees() {
        let modes = IoModes::<u32>::new();
        assert_eq!(open(&modes, 1, READ_COMPLETE, 1), "served");
    }
}
