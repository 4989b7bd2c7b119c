//! dmm's cluster: the nodes that serve volumes, and which node owns each
//! volume, kept in etcd rather than in a consensus of our own.
//!
//! - **Membership** ([`Cluster::join`]): each daemon registers itself
//!   under a lease it renews six times per TTL; a node whose lease lapses
//!   disappears from `dmm nodes` by itself.
//! - **Ownership** ([`Cluster::claim`], [`Cluster::hand_over`], …): one key
//!   per volume names its owner; the key's `mod_revision` is the volume's
//!   *fencing token*. Every change of owner is a compare-and-swap on that
//!   revision, so a node acting on an old view changes nothing.
//! - **Self-fencing** ([`Fence`]): a node serves its volumes only while it
//!   is sure its lease is alive, closing a third of the TTL before the
//!   lease could expire for the others, and reopening only once it has read
//!   every owner again.
//!
//! The keys and their records are described field by field in
//! [`records`]. Every call to etcd is bounded ([`CALL_WITHIN`]).

mod error;
mod etcd;
mod fence;
mod membership;
mod ownership;
pub mod records;

pub use error::{Error, ErrorKind, Result};
pub use etcd::CALL_WITHIN;
pub use fence::Fence;
pub use membership::{Cluster, ClusterConfig, NodeState};
pub use ownership::{Owner, Token};
pub use records::{MovePhase, MoveRecord, NodeRecord, OwnerRecord};
