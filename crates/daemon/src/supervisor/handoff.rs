//! A migration's volume in the cluster (`--etcd`): claimed when it opens,
//! handed to the peer it moves to at the switchover, taken back by a
//! rollback, marked committed, released when the migration is deleted.
//! Without a cluster only the peer is told (the handoff), as before.
//!
//! Lock order: `owner_changes`, then the catalog; the open engines' lock
//! is never held across either.

use std::sync::Arc;
use std::time::Duration;

use dmm_catalog::{MigrationId, MigrationRecord, State};
use dmm_cluster::MovePhase;
use dmm_store::BlockStore;

use super::{PeerCall, Supervisor};
use crate::cluster::{refused, unavailable};
use crate::error::{Error, ErrorKind, Result};

/// Pause between two tries of a handoff.
const HANDOFF_AGAIN_AFTER: Duration = Duration::from_secs(3);

/// How one try of a handoff ended.
enum Handoff {
    /// The peer serves the volume.
    Done,
    /// The migration is no longer switched over (a verb moved it on).
    NotDue,
    /// The peer or etcd did not answer: try again.
    Again(String),
}

impl Supervisor {
    /// Claims an engine's export in the cluster and fences it; no cluster:
    /// the export as it is.
    pub(super) async fn claim(
        &self,
        export: Option<(String, Arc<dyn BlockStore>)>,
    ) -> Result<Option<(String, Arc<dyn BlockStore>)>> {
        let (Some(node), Some((name, device))) = (&self.node, &export) else {
            return Ok(export);
        };
        node.claim(name, device.size()).await?;
        Ok(Some((name.clone(), node.fenced(name, device.clone()))))
    }

    /// Hands the volume of a migration moved to a peer over, and asks the
    /// peer to serve it, in a task that tries again every few seconds
    /// until the peer does, while the migration stays switched over.
    pub(super) fn start_handoff(self: &Arc<Self>, id: MigrationId) {
        if !self.handing.lock().insert(id) {
            return;
        }
        let supervisor = self.clone();
        tokio::spawn(async move {
            let mut tries = 0u32;
            loop {
                match supervisor.try_handoff(id).await {
                    Handoff::Done | Handoff::NotDue => break,
                    Handoff::Again(line) => {
                        // The first failure and one in twenty after it.
                        if tries.is_multiple_of(20) {
                            supervisor.note(id, "error", &format!("{line}; trying again"));
                        }
                        tries += 1;
                    }
                }
                tokio::time::sleep(HANDOFF_AGAIN_AFTER).await;
            }
            supervisor.handing.lock().remove(&id);
        });
    }

    async fn try_handoff(&self, id: MigrationId) -> Handoff {
        let _changing = self.owner_changes.lock().await;
        let Ok(record) = self.catalog.get(id) else {
            return Handoff::NotDue;
        };
        let switched = matches!(record.state, State::Verifying | State::SwitchedOver);
        let Some((peer, export)) = self.moved_to_peer(&record) else {
            return Handoff::NotDue;
        };
        if record.pending.is_some() || !switched {
            return Handoff::NotDue;
        }
        if let Err(err) = self.hand_over_owned(&export, &peer).await {
            return Handoff::Again(err.line());
        }
        match self.ask_peer(&peer, PeerCall::Serve(&export)).await {
            Ok(()) => {
                let line = format!(
                    "{peer} serves export {export} now; this node forwards its clients there"
                );
                self.note(id, "info", &line);
                Handoff::Done
            }
            Err(line) => Handoff::Again(line),
        }
    }

    /// Makes `peer` the owner of `export` unless it is already (the
    /// commit makes sure the handoff happened).
    pub(super) async fn hand_over_in_cluster(&self, export: &str, peer: &str) -> Result<()> {
        let _changing = self.owner_changes.lock().await;
        self.hand_over_owned(export, peer).await
    }

    async fn hand_over_owned(&self, export: &str, peer: &str) -> Result<()> {
        let Some(node) = &self.node else {
            return Ok(());
        };
        let cluster = &node.cluster;
        let owner = cluster.owner(export).await.map_err(unavailable)?;
        match owner {
            Some(owner) if owner.node == cluster.node() => {
                let token = cluster
                    .hand_over(export, owner.token, peer)
                    .await
                    .map_err(refused)?;
                tracing::info!(%export, %peer, token, "handed over");
                Ok(())
            }
            Some(owner) if owner.node == peer => Ok(()),
            owner => Err(not_ours(export, owner.map(|o| o.node))),
        }
    }

    /// A rollback takes back the volume handed to `peer`, if it was.
    pub(super) async fn take_back_in_cluster(&self, export: &str, peer: &str) -> Result<()> {
        let Some(node) = &self.node else {
            return Ok(());
        };
        let _changing = self.owner_changes.lock().await;
        let cluster = &node.cluster;
        match cluster.owner(export).await.map_err(unavailable)? {
            Some(owner) if owner.node == cluster.node() => Ok(()),
            Some(owner) if owner.node == peer => {
                if owner
                    .moving
                    .is_some_and(|m| m.phase == MovePhase::Committed)
                {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!("the move of {export} to {peer} is committed: {peer} owns it"),
                    ));
                }
                let token = cluster.take_back(export).await.map_err(refused)?;
                tracing::info!(%export, token, "taken back for the rollback");
                Ok(())
            }
            owner => Err(not_ours(export, owner.map(|o| o.node))),
        }
    }

    /// Records the commit of a move in the cluster.
    pub(super) async fn committed_in_cluster(&self, export: &str) -> Result<()> {
        let Some(node) = &self.node else {
            return Ok(());
        };
        let _changing = self.owner_changes.lock().await;
        node.cluster.committed(export).await.map_err(refused)
    }

    /// A deleted migration gives its volume up: the owner key if this
    /// node owns it, the move's record if it moved away.
    pub(super) async fn release_in_cluster(&self, record: &MigrationRecord) -> Result<()> {
        let (Some(node), Some(export)) = (&self.node, self.export_of(record)) else {
            return Ok(());
        };
        let _changing = self.owner_changes.lock().await;
        node.cluster.release(&export).await.map_err(refused)
    }
}

fn not_ours(export: &str, owner: Option<String>) -> Error {
    let who = owner.unwrap_or_else(|| "no node".to_owned());
    Error::new(
        ErrorKind::Conflict,
        format!("{export} is not this node's to hand over: {who} owns it"),
    )
}
