//! dmm's streams (issue 16; the design is in `DESIGN.md` next to this
//! crate): append-only files whose bytes live in extents on the tiers of
//! an orbit and move to a denser tier while the writer keeps appending.
//!
//! So far:
//! - the orbit an admin writes, its tiers and their formats ([`orbit`]);
//! - a stream's extent map and the move's phases as one table
//!   ([`extents`]);
//! - the format of the dense tiers ([`seekable`]), zstd's seekable
//!   format, which any offset is read from by decompressing one frame and
//!   which the standard `zstd -d` reads whole.

pub mod extents;
pub mod orbit;
pub mod seekable;
