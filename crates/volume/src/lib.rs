//! Live volume migration.
//!
//! A [`Migration`] moves a volume from a source [`BlockStore`] to a
//! destination while clients keep using it through a [`VirtualDevice`]
//! (which the NBD server exports under one name for the whole migration).
//! The strategy decides how client writes are routed while the copier works
//! (`strategy.rs`); the state survives a kill -9 or a power cut at any
//! instant (`persist/`, `ledger.rs`; crash tests write it through
//! [`CrashFiles`], which lose power); a finished migration is verified
//! chunk by chunk, then committed or rolled back. DESIGN.md describes the
//! whole.
//!
//! The modules are private: other crates use the names re-exported here.
//!
//! [`BlockStore`]: dmm_store::BlockStore

mod aio;
mod chunks;
mod copy;
mod device;
mod digest;
mod error;
mod ledger;
mod locks;
mod migration;
mod pacing;
mod persist;
mod progress;
mod strategy;

pub use device::VirtualDevice;
pub use digest::{DIGESTS_PER_CALL, RemoteDigests, digest};
pub use dmm_control::{Controls, Priority};
pub use error::{ErrorKind, MigrationError, Operation};
pub use migration::{Migration, MigrationConfig, Verify, negotiate};
pub use persist::{CrashFiles, DiskFiles, Phase, StateFile, StateFiles};
pub use progress::{Activity, Progress};
pub use strategy::Strategy;
