//! The run controls every migration engine shares, and the units admins
//! type them in.
//!
//! A volume migration and a tree migration are paused, stopped, throttled
//! and prioritized the same way; both engines depend on this crate rather
//! than one on the other. Sizes (`64K`, `1.5G`) are parsed here too, so the
//! daemon's properties and the CLI's options read them alike, and every
//! engine's errors print their causes on one line alike.

mod controls;
mod report;
mod units;

pub use controls::{Controls, Priority, RateLimiter};
pub use report::report;
pub use units::{ValueError, human, parse_size};
