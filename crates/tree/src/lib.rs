//! Tree migration: a directory tree moved to another directory while
//! applications keep using it through a FUSE access point that shows the
//! target. Directories are populated when first looked at, file segments
//! fetched when first read or written, the rest migrated in the
//! background; every namespace change is journaled so that nothing is lost
//! or brought back. `DESIGN.md` next to this crate explains the rules.

pub mod access;
pub mod error;
pub mod fidelity;
pub mod journal;
mod lock;
pub mod migration;
pub mod namespace;
pub mod source;
mod threads;
pub mod verify;
pub mod worker;

pub use error::{Error, ErrorKind, Result};
pub use migration::{TreeConfig, TreeMigration, TreeProgress, check};
pub use namespace::Collision;
