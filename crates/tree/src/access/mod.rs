//! The access point: a FUSE file system showing the target tree, where
//! applications work while the migration runs.
//!
//! It is a passthrough to the target directory, inode by inode (`nodes`
//! finds each inode the kernel knows again, across renames, without
//! holding a descriptor for every one of them),
//! with the migration's hooks in front of the operations that need them:
//! a directory is populated before anything looks inside it, the segments
//! a read or write touches are fetched first, and namespace changes to
//! tracked entries go through the journal (`namespace::changes`).
//!
//! Requests are served by several FUSE threads, so a client waiting for a
//! fetch does not hold up the others. Files with nothing left to fetch are
//! passed through to the target where the kernel allows it (`iomode`), and
//! names and attributes of entries dmm no longer fills in are cached by
//! the kernel for long.

mod caller;
mod files;
mod fs;
mod iomode;
mod mount;
mod nodes;
mod reply;

pub use mount::{AccessPoint, AccessUsers, check_mountpoint, clear_stale_mount};
