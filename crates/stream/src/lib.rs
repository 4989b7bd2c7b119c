//! dmm's streams (issue 16; the design is in `DESIGN.md` next to this
//! crate): append-only files whose bytes live in extents on the tiers of
//! an orbit and move to a denser tier while the writer keeps appending,
//! without the writer waiting for the move.
//!
//! - [`orbit`]: the tiers an admin writes, least dense first;
//! - [`seekable`]: the dense tiers' format, zstd's seekable format, read
//!   back whole by the standard `zstd -d`;
//! - [`extents`]: a stream's extent map and a move's phases, one table;
//! - `extent_file`: one extent's file, appended and read at once;
//! - `stream`: the appender, the reader, and the swap of the tail;
//! - `journal`: the phased commits of the maps and moves (SQLite);
//! - `store`: the streams of a store, reopened after a crash;
//! - `mover`: a move, phase by phase;
//! - `policy`: which streams move when, and the loop that moves them;
//! - `access`: the FUSE access point.

mod access;
mod error;
mod extent_file;
pub mod extents;
mod journal;
mod mover;
pub mod orbit;
mod policy;
pub mod seekable;
mod store;
mod stream;

pub use access::{StreamFs, mount};
pub use error::{Error, ErrorKind, Result};
pub use extent_file::ExtentFile;
pub use journal::{Figures, Owner};
pub use mover::Moved;
pub use policy::{Policy, StreamReport, StreamRow};
pub use store::StreamStore;
pub use stream::{Attributes, Stream};
