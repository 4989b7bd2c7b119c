//! Joining the cluster and staying in it: the node's record under its
//! lease, the lease renewed six times per TTL, the owners read again at
//! each renewal (the view [`Cluster::serves`] answers from), and the fence
//! extended only then.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{GetOptions, PutOptions};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};
use crate::etcd::Etcd;
use crate::fence::Fence;
use crate::ownership::{Owner, read_owners};
use crate::records::{self, NodeRecord};

/// How a node joins.
pub struct ClusterConfig {
    /// etcd's client URLs.
    pub endpoints: Vec<String>,
    /// What the node says about itself.
    pub node: NodeRecord,
    /// The lease's TTL: a node that stops renewing is down this long after.
    pub lease_ttl: Duration,
    /// Free bytes where the node keeps its volumes, asked at each renewal.
    pub free_bytes: Box<dyn Fn() -> u64 + Send + Sync>,
}

/// This node's membership and its view of who owns what.
///
/// Locks: `view` and `record` are held only to copy or replace a value,
/// never across a call to etcd or while taking another lock.
pub struct Cluster {
    pub(crate) etcd: Etcd,
    pub(crate) node: String,
    record: Mutex<NodeRecord>,
    free_bytes: Box<dyn Fn() -> u64 + Send + Sync>,
    ttl: Duration,
    lease: AtomicI64,
    pub(crate) fence: Fence,
    pub(crate) view: RwLock<BTreeMap<String, Owner>>,
    stop: CancellationToken,
    renewing: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A node as `dmm nodes` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct NodeState {
    pub name: String,
    /// Its lease is alive.
    pub up: bool,
    /// What it registered (none for a node that is down).
    pub record: Option<NodeRecord>,
    /// The volumes it owns.
    pub owns: Vec<String>,
}

impl Cluster {
    /// Registers this node under a new lease and keeps it alive until
    /// [`Cluster::leave`].
    pub async fn join(config: ClusterConfig) -> Result<Arc<Cluster>> {
        let etcd = Etcd::connect(&config.endpoints).await?;
        let ttl = Duration::from_secs(config.lease_ttl.as_secs().max(2));
        let mut node = config.node;
        node.free_bytes = (config.free_bytes)();
        let cluster = Arc::new(Cluster {
            etcd,
            node: node.name.clone(),
            record: Mutex::new(node),
            free_bytes: config.free_bytes,
            ttl,
            lease: AtomicI64::new(0),
            fence: Fence::closed(),
            view: RwLock::new(BTreeMap::new()),
            stop: CancellationToken::new(),
            renewing: Mutex::new(None),
        });
        let sent = Instant::now();
        cluster.register().await?;
        cluster.refresh().await?;
        cluster.fence.renewed(sent, ttl);
        let renewing = tokio::spawn(cluster.clone().keep_renewing());
        *cluster.renewing.lock() = Some(renewing);
        tracing::info!(node = %cluster.node, ttl_s = ttl.as_secs(), "joined the cluster");
        Ok(cluster)
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    pub fn lease_ttl(&self) -> Duration {
        self.ttl
    }

    /// Every node: those up, and those down that still own volumes.
    pub async fn nodes(&self) -> Result<Vec<NodeState>> {
        Ok(self.survey().await?.0)
    }

    /// Every node, and every volume's owner, as etcd says now (one read of
    /// the owners for both).
    pub async fn survey(&self) -> Result<(Vec<NodeState>, BTreeMap<String, Owner>)> {
        let listed = self
            .etcd
            .call("list", "nodes", |mut c| async move {
                c.get(records::NODES, Some(GetOptions::new().with_prefix()))
                    .await
            })
            .await?;
        let mut nodes = BTreeMap::new();
        for kv in listed.kvs() {
            let record: NodeRecord = decode(kv.value(), "node", kv.key())?;
            let state = NodeState {
                name: record.name.clone(),
                up: true,
                record: Some(record),
                owns: Vec::new(),
            };
            nodes.insert(state.name.clone(), state);
        }
        let owners = read_owners(&self.etcd).await?;
        for (volume, owner) in &owners {
            let node = nodes
                .entry(owner.node.clone())
                .or_insert_with(|| NodeState {
                    name: owner.node.clone(),
                    up: false,
                    record: None,
                    owns: Vec::new(),
                });
            node.owns.push(volume.clone());
        }
        Ok((nodes.into_values().collect(), owners))
    }

    /// Stops renewing and revokes the lease: the node is down at once.
    pub async fn leave(&self) {
        self.stop.cancel();
        let renewing = self.renewing.lock().take();
        if let Some(task) = renewing {
            let _ = task.await;
        }
        self.fence.close();
        let lease = self.lease.load(Ordering::Acquire);
        let revoked = self
            .etcd
            .call("revoke the lease of", &self.node, |mut c| async move {
                c.lease_revoke(lease).await
            })
            .await;
        if let Err(err) = revoked {
            tracing::warn!("leaving the cluster: {err}");
        }
    }

    /// A new lease, and the node's record under it.
    async fn register(&self) -> Result<()> {
        let ttl = self.ttl.as_secs() as i64;
        let granted = self
            .etcd
            .call("grant a lease to", &self.node, |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        self.lease.store(granted.id(), Ordering::Release);
        self.put_record().await
    }

    async fn put_record(&self) -> Result<()> {
        let lease = self.lease.load(Ordering::Acquire);
        let record = self.record.lock().clone();
        let value = serde_json::to_vec(&record).expect("a node record serializes");
        let key = records::node_key(&self.node);
        self.etcd
            .call("register", &self.node, |mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                        .await
                }
            })
            .await
            .map(drop)
    }

    /// Renews the lease every sixth of its TTL until [`Cluster::leave`].
    async fn keep_renewing(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.ttl / 6);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = self.stop.cancelled() => return,
            }
            match self.renew_once().await {
                Ok(()) if failing => {
                    tracing::info!(node = %self.node, "lease renewed again");
                    failing = false;
                }
                Ok(()) => {}
                Err(err) if !failing => {
                    tracing::warn!(node = %self.node, "{err}; fence closes in {:?}", self.fence.remaining());
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }

    /// One renewal: the keep-alive, the owners read again, then the fence
    /// extended from the instant the keep-alive was sent. A lease etcd no
    /// longer knows closes the fence and is replaced.
    async fn renew_once(&self) -> Result<()> {
        let sent = Instant::now();
        let ttl = match self.keep_alive().await {
            // etcd no longer knows the lease.
            Err(err) if err.kind() == ErrorKind::Refused => 0,
            answer => answer?,
        };
        if ttl == 0 {
            self.fence.close();
            tracing::warn!(node = %self.node, "the lease expired; joining again");
            self.register().await?;
        } else {
            self.update_free_bytes().await?;
        }
        self.refresh().await?;
        self.fence.renewed(sent, self.ttl);
        Ok(())
    }

    /// Sends one keep-alive; the TTL etcd answered (0: expired).
    async fn keep_alive(&self) -> Result<i64> {
        let lease = self.lease.load(Ordering::Acquire);
        self.etcd
            .call("renew the lease of", &self.node, |mut c| async move {
                let (mut keeper, mut answers) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                Ok(answers.message().await?.map_or(0, |answer| answer.ttl()))
            })
            .await
    }

    /// Registers again when the free space moved by more than 1 %.
    async fn update_free_bytes(&self) -> Result<()> {
        let free = (self.free_bytes)();
        {
            let mut record = self.record.lock();
            if free.abs_diff(record.free_bytes) <= record.free_bytes / 100 {
                return Ok(());
            }
            record.free_bytes = free;
        }
        self.put_record().await
    }

    /// Reads every owner again into the view.
    pub(crate) async fn refresh(&self) -> Result<()> {
        let owners = read_owners(&self.etcd).await?;
        *self.view.write() = owners;
        Ok(())
    }
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    value: &[u8],
    what: &'static str,
    key: &[u8],
) -> Result<T> {
    serde_json::from_slice(value).map_err(|err| {
        Error::new(ErrorKind::Corrupt, "read", String::from_utf8_lossy(key))
            .with_detail(format!("not a {what} record: {err}"))
    })
}
