//! This daemon as a node of a cluster on etcd (`--etcd`).
//!
//! - Every volume a migration exports is claimed in etcd when the
//!   migration opens; one another node owns is refused, naming the owner
//!   (the source of a move between nodes keeps serving the volume it
//!   handed over: every request of the move goes through it).
//! - Every export of a volume is *fenced* ([`Node::fenced`]): each request
//!   is served only while this node's fence is open and it owns the
//!   volume (or is the node it moves from); otherwise the client gets
//!   EPERM, and the refusal is counted, rather than a write that another
//!   owner would never see.
//! - Any node serves any volume ([`route`]): a client asking a node for a
//!   volume it does not serve is forwarded to the owner, each request
//!   carrying the owner's token, which the owner checks.
//! - The changes of owner of a move are made by the sending node: the
//!   handoff at the switchover, the take-back of a rollback, the commit,
//!   the release when the migration is deleted.

mod fenced;
mod route;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dmm_cluster::{Cluster, ClusterConfig, NodeRecord, NodeState, Owner};
use dmm_store::BlockStore;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use fenced::Fenced;

pub use route::Router;

/// How a daemon joins a cluster.
#[derive(Debug, Clone)]
pub struct Joining {
    /// etcd's client URLs.
    pub endpoints: Vec<String>,
    pub lease_ttl: Duration,
}

/// This node in the cluster, and the requests it refused.
pub struct Node {
    pub cluster: Arc<Cluster>,
    refusals: Refusals,
}

/// Requests refused, by reason.
#[derive(Default)]
struct Refusals {
    /// The fence was closed.
    fenced: AtomicU64,
    /// Another node owns the volume.
    not_owner: AtomicU64,
    /// Forwarded under a token that is not current.
    stale: AtomicU64,
}

/// What `dmm nodes` shows (`GET /api/cluster/nodes`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterView {
    /// The node that answered.
    pub node: String,
    /// Whether its fence is closed (it serves none of its volumes).
    pub fenced: bool,
    pub lease_ttl_ms: u64,
    /// Requests it refused because its fence was closed, because another
    /// node owns the volume, and forwarded ones under a stale token.
    pub refused_fenced: u64,
    pub refused_not_owner: u64,
    pub refused_stale: u64,
    pub nodes: Vec<NodeState>,
    /// Every volume's owner, its token and the move under way.
    pub volumes: std::collections::BTreeMap<String, Owner>,
}

/// What `dmm where VOLUME` shows (`GET /api/cluster/volumes/VOLUME`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Whereabouts {
    pub volume: String,
    /// None: no node owns it.
    pub owner: Option<Owner>,
    /// Whether the owner's lease is alive.
    pub owner_up: bool,
}

impl Node {
    /// Joins the cluster as `name`, with the addresses other nodes and
    /// clients reach this one at.
    pub async fn join(
        joining: &Joining,
        name: &str,
        api: Option<String>,
        nbd: Option<String>,
        state_dir: &Path,
    ) -> anyhow::Result<Arc<Node>> {
        let dir = state_dir.to_owned();
        let config = ClusterConfig {
            endpoints: joining.endpoints.clone(),
            node: NodeRecord {
                name: name.to_owned(),
                api,
                nbd,
                free_bytes: 0,
                version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            lease_ttl: joining.lease_ttl,
            free_bytes: Box::new(move || free_bytes(&dir)),
        };
        let cluster = Cluster::join(config).await.map_err(|err| {
            anyhow::anyhow!(
                "cannot join the cluster at {}: {err}",
                joining.endpoints.join(",")
            )
        })?;
        Ok(Arc::new(Node {
            cluster,
            refusals: Refusals::default(),
        }))
    }

    /// Claims `volume` for a migration of this node: refused when another
    /// node owns it, unless it is moving away from this node.
    pub async fn claim(&self, volume: &str, size: u64) -> Result<()> {
        if self.owned_here(volume).await? {
            return Ok(());
        }
        self.cluster
            .claim(volume, size)
            .await
            .map(drop)
            .map_err(refused)
    }

    /// Whether this node owns `volume` (or it moves away from this node);
    /// refused when another node owns it. False: no node does.
    pub async fn owned_here(&self, volume: &str) -> Result<bool> {
        let me = self.cluster.node();
        match self.cluster.owner(volume).await.map_err(unavailable)? {
            Some(owner) if owner.node == me => Ok(true),
            Some(owner) if owner.moving.as_ref().is_some_and(|m| m.from == me) => Ok(true),
            Some(owner) => Err(owned_elsewhere(volume, &owner)),
            None => Ok(false),
        }
    }

    /// `store`, served only while this node may serve `volume`.
    pub fn fenced(
        self: &Arc<Self>,
        volume: &str,
        store: Arc<dyn BlockStore>,
    ) -> Arc<dyn BlockStore> {
        Arc::new(Fenced::new(self.clone(), volume, None, store))
    }

    pub async fn view(&self) -> Result<ClusterView> {
        let (nodes, volumes) = self.cluster.survey().await.map_err(unavailable)?;
        Ok(ClusterView {
            node: self.cluster.node().to_owned(),
            fenced: !self.cluster.fence().is_open(),
            lease_ttl_ms: self.cluster.lease_ttl().as_millis() as u64,
            refused_fenced: self.refusals.fenced.load(Ordering::Relaxed),
            refused_not_owner: self.refusals.not_owner.load(Ordering::Relaxed),
            refused_stale: self.refusals.stale.load(Ordering::Relaxed),
            nodes,
            volumes,
        })
    }

    pub async fn whereabouts(&self, volume: &str) -> Result<Whereabouts> {
        let owner = self.cluster.owner(volume).await.map_err(unavailable)?;
        let owner_up = match &owner {
            Some(owner) => {
                let nodes = self.cluster.nodes().await.map_err(unavailable)?;
                nodes.iter().any(|n| n.name == owner.node && n.up)
            }
            None => false,
        };
        Ok(Whereabouts {
            volume: volume.to_owned(),
            owner,
            owner_up,
        })
    }

    /// Leaves the cluster (the daemon stops).
    pub async fn leave(&self) {
        self.cluster.leave().await;
    }
}

fn owned_elsewhere(volume: &str, owner: &Owner) -> Error {
    Error::new(
        ErrorKind::Conflict,
        format!(
            "volume {volume} is owned by {} (token {}); dmm where {volume} tells more",
            owner.node, owner.token
        ),
    )
}

/// An etcd failure on a verb.
pub fn unavailable(err: dmm_cluster::Error) -> Error {
    Error::new(ErrorKind::Failed, err.to_string())
}

/// A refused change of owner.
pub fn refused(err: dmm_cluster::Error) -> Error {
    match err.kind() {
        dmm_cluster::ErrorKind::Conflict => Error::new(ErrorKind::Conflict, err.to_string()),
        _ => unavailable(err),
    }
}

/// Free bytes of the file system holding `dir` (0 if it cannot be read).
fn free_bytes(dir: &Path) -> u64 {
    rustix::fs::statvfs(dir).map_or(0, |s| s.f_bavail.saturating_mul(s.f_frsize))
}
