//! Tree migration: a directory tree moved to another directory while
//! applications keep using it through a FUSE access point that shows the
//! target. Directories are populated when first looked at, file segments
//! fetched when first read or written, the rest migrated in the
//! background; every namespace change is journaled so that nothing is lost
//! or brought back. `DESIGN.md` next to this crate explains the rules.
//!
//! The daemon drives a migration through [`TreeJob`] (a [`TreeMigration`]
//! watched to its end and verified), configured by a [`TreeConfig`] that
//! [`check`] validates first; everything else is the engine's own.

mod access;
mod error;
mod fidelity;
mod job;
mod journal;
mod lock;
mod migration;
mod namespace;
mod source;
mod threads;
mod verify;
mod worker;

pub use access::{AccessPoint, AccessUsers, check_mountpoint, clear_stale_mount};
pub use error::{Error, ErrorKind, Result};
pub use job::{Finished, TreeJob, TreeKind, TreePhase, TreeReport};
pub use migration::{ErrorReport, TreeConfig, TreeMigration, TreeProgress, check};
pub use namespace::{Collision, Counts};
pub use verify::Mismatch;
