//! What dmm keeps in etcd, key by key. Every value is a JSON object; a
//! field added later is optional, so nodes of two versions read each
//! other's records.
//!
//! | key | lease | value | written by |
//! |---|---|---|---|
//! | `/dmm/nodes/NODE` | the node's | [`NodeRecord`] | the node, at join and when its figures change |
//! | `/dmm/owners/VOLUME` | none | [`OwnerRecord`] | the owner, or the node handing the volume over or taking it back |
//! | `/dmm/moves/VOLUME` | none | [`MoveRecord`] | the node the volume moves from, in the same transaction as the owner |
//!
//! - A node's key carries its lease: when the node stops renewing it, etcd
//!   deletes the key and the node is *down*.
//! - An owner key carries no lease: a volume stays owned by a node that is
//!   down (its data is there), and waits for it.
//! - The owner key's `mod_revision` is the volume's **fencing token**:
//!   every change of owner is a transaction that compares it, so a node
//!   holding an older token changes nothing; a node serving under a token
//!   checks it is still the current one.
//! - The move key exists only while a volume moves between nodes: it says
//!   how far the move went, so a node restarted in the middle of one knows
//!   whether it still owns the volume. It is deleted when the move is
//!   rolled back or the source releases the volume.

use serde::{Deserialize, Serialize};

/// Prefix of every key dmm writes.
pub const PREFIX: &str = "/dmm/";
/// Prefix of the node keys.
pub const NODES: &str = "/dmm/nodes/";
/// Prefix of the owner keys.
pub const OWNERS: &str = "/dmm/owners/";
/// Prefix of the move keys.
pub const MOVES: &str = "/dmm/moves/";

/// A node as it registered itself (`/dmm/nodes/NODE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's name: the name its certificate is valid for, which
    /// other nodes check when they call it.
    pub name: String,
    /// Its API's TCP address (`HOST:PORT`), if it listens on TCP.
    #[serde(default)]
    pub api: Option<String>,
    /// Its NBD listener's TCP address, if any.
    #[serde(default)]
    pub nbd: Option<String>,
    /// Free bytes in its state directory's file system, when it last
    /// looked.
    #[serde(default)]
    pub free_bytes: u64,
    /// The dmm version it runs.
    #[serde(default)]
    pub version: String,
}

/// Who owns a volume (`/dmm/owners/VOLUME`, VOLUME being its export name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The owning node's name.
    pub node: String,
    /// The volume's size in bytes.
    #[serde(default)]
    pub size: u64,
}

/// How far a move between nodes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MovePhase {
    /// Switched over: `to` owns the volume, `from` still holds every
    /// write (a rollback gives it back to `from`).
    Handed,
    /// Committed: the volume is `to`'s alone; `from` releases its copy.
    Committed,
}

impl MovePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MovePhase::Handed => "handed",
            MovePhase::Committed => "committed",
        }
    }
}

/// A move between nodes under way (`/dmm/moves/VOLUME`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub phase: MovePhase,
    /// The node the volume moves from (it wrote this record).
    pub from: String,
    /// The node the volume moves to.
    pub to: String,
}

pub(crate) fn node_key(node: &str) -> String {
    format!("{NODES}{node}")
}

pub(crate) fn owner_key(volume: &str) -> String {
    format!("{OWNERS}{volume}")
}

pub(crate) fn move_key(volume: &str) -> String {
    format!("{MOVES}{volume}")
}
