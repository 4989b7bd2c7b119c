//! Live volume migration.
//!
//! A [`Migration`] moves a volume from a source [`BlockStore`] to a
//! destination while clients keep using it through a [`VirtualDevice`]
//! (which the NBD server exports under one name for the whole migration).
//! The strategy decides how client writes are routed while the copier works
//! ([`strategy`]); the state survives a kill -9 at any instant
//! ([`persist`]); a finished migration is verified chunk by chunk, then
//! committed or rolled back.
//!
//! [`BlockStore`]: dmm_store::BlockStore

pub mod aio;
pub mod chunks;
pub mod copy;
pub mod device;
pub mod error;
pub mod ledger;
pub mod locks;
pub mod migration;
pub mod persist;
pub mod progress;
pub mod strategy;

pub use chunks::{ChunkMap, ChunkState};
pub use device::VirtualDevice;
pub use dmm_control::{Controls, Priority};
pub use error::{ErrorKind, MigrationError, Operation};
pub use migration::{Migration, MigrationConfig, Verify, negotiate};
pub use persist::Phase;
pub use progress::{Activity, Progress};
pub use strategy::{Mode, Strategy};
