//! The destination side of a volume moving between nodes.
//!
//! A peer asks this node to receive a volume into a local path (`POST
//! /api/peer/receive`): this node checks that it can (the path absolute,
//! not in use by any of its migrations or receptions, the size and the
//! space there), creates the image if it is missing, and offers it as an
//! NBD export that only that peer's certificate can see, on its TLS NBD
//! listener. The peer's own migration copies into that export, and
//! verifies it by asking for digests of its chunks (`POST
//! /api/peer/digests`), which this node computes on its image.
//!
//! At the switchover the sender hands the volume over (`POST
//! /api/peer/serve`): this node serves it under its export name, every
//! request going through the sender's export, whose migration still
//! tracks every write so that a rollback loses none. At the commit (`POST
//! /api/peer/own`) this node serves it from its image alone. When the
//! sender deletes its migration (`POST /api/peer/release`) the reception
//! ends; a volume not owned by then stops being served.
//!
//! Each reception and its stage are in the catalog: a restarted daemon
//! offers them again ([`restore`]).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use dmm_catalog::{Catalog, Reception, ReceptionStage as Stage};
use dmm_nbd::{Export, ExportTable, NbdStore};
use dmm_store::{BlockStore, Capabilities, Extent, FileStore, OpenOptions, ZeroMode};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::cluster::Node;
use crate::error::{Error, ErrorKind, Result};
use crate::peers::Peers;

/// What a peer asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveRequest {
    /// The local path the volume goes to (created if missing).
    pub path: String,
    /// The volume's size.
    pub size: u64,
    /// Its allocated bytes: the space the destination needs at least.
    pub allocated: u64,
    /// The volume's export name on the sending node.
    pub export: String,
}

/// Where the peer writes the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receiving {
    /// The export, offered to the sending peer only.
    pub export: String,
    /// This node's NBD listener (TLS required).
    pub nbd: String,
}

/// How long a request forwarded to the sender waits for its reply.
const OWNER_REPLY_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Most ranges one digests request may name.
pub const MOST_DIGESTS: usize = 256;

/// The node's side of receptions: its catalog, its exports, its peers,
/// and the volumes served through their senders.
pub struct Receiver<'a> {
    pub catalog: &'a Catalog,
    pub exports: &'a ExportTable,
    pub peers: &'a Peers,
    pub handoffs: &'a Handoffs,
    /// This node in its cluster, if it is in one: the volumes it serves
    /// are fenced.
    pub node: Option<&'a Arc<Node>>,
}

/// The volumes handed over and not committed yet, by export name.
#[derive(Default)]
pub struct Handoffs(parking_lot::Mutex<std::collections::HashMap<String, Arc<Handed>>>);

/// The export a volume from `peer` named `export` is received under.
fn export_name(peer: &str, export: &str) -> String {
    format!("receive.{peer}.{export}")
}

fn catalog_error(err: dmm_catalog::Error) -> Error {
    Error::caused(ErrorKind::Failed, "the catalog failed", err)
}

impl Receiver<'_> {
    /// Prepares the reception of a volume from `peer`. Asking again for
    /// the same path gives the same export (a sender that restarts asks
    /// again).
    pub fn receive(
        &self,
        peer: &str,
        request: &ReceiveRequest,
        paths_in_use: &[String],
    ) -> Result<Receiving> {
        let refuse = |why: String| Error::new(ErrorKind::Conflict, why);
        let Some(nbd) = self
            .peers
            .nbd
            .clone()
            .filter(|_| self.peers.nbd_tls_required)
        else {
            return Err(refuse(format!(
                "{} serves no NBD listener with TLS required (--nbd-listen with --tls=require)",
                node_name(self.peers)
            )));
        };
        let name = export_name(peer, &request.export);
        if let Some(existing) = self.exports.find(&name) {
            return match existing.description == request.path {
                true => Ok(Receiving { export: name, nbd }),
                false => Err(refuse(format!(
                    "export {name} already receives {}",
                    existing.description
                ))),
            };
        }
        let path = Path::new(&request.path);
        if !path.is_absolute() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("{} is not an absolute path", request.path),
            ));
        }
        let received = self.catalog.receptions().map_err(catalog_error)?;
        if paths_in_use.contains(&request.path) || received.iter().any(|r| r.path == request.path) {
            return Err(refuse(format!(
                "{} is in use by a migration on {}",
                request.path,
                node_name(self.peers)
            )));
        }
        let store = open_or_create(path, request)?;
        let reception = Reception {
            peer: peer.to_owned(),
            export: request.export.clone(),
            path: request.path.clone(),
            stage: Stage::Receiving,
            owner_nbd: None,
        };
        self.catalog
            .record_reception(&reception)
            .map_err(catalog_error)?;
        self.offer(&reception, store)?;
        tracing::info!(%peer, path = %request.path, export = %name, "receiving a volume");
        Ok(Receiving { export: name, nbd })
    }

    /// Offers a reception's image to its sender only.
    fn offer(&self, reception: &Reception, store: Arc<dyn BlockStore>) -> Result<()> {
        let name = export_name(&reception.peer, &reception.export);
        let export = Export::new(name, store)
            .with_description(reception.path.clone())
            .only_for(vec![reception.peer.clone()]);
        self.exports
            .insert(export)
            .map(drop)
            .map_err(|e| Error::caused(ErrorKind::Conflict, "cannot export it", e))
    }

    /// The reception of `export` from `peer` and its image.
    fn received(&self, peer: &str, export: &str) -> Result<(Reception, Arc<dyn BlockStore>)> {
        let missing = || {
            Error::new(
                ErrorKind::NotFound,
                format!("nothing is received from {peer} as {export}"),
            )
        };
        let reception = self
            .catalog
            .reception(peer, export)
            .map_err(catalog_error)?
            .ok_or_else(missing)?;
        let offered = self
            .exports
            .find(&export_name(peer, export))
            .ok_or_else(missing)?;
        Ok((reception, offered.store.clone()))
    }

    /// The digests of ranges of a received image, computed here.
    pub async fn digests(
        &self,
        peer: &str,
        export: &str,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<blake3::Hash>> {
        if ranges.len() > MOST_DIGESTS {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("at most {MOST_DIGESTS} ranges per request"),
            ));
        }
        let (_, image) = self.received(peer, export)?;
        let mut digests = Vec::with_capacity(ranges.len());
        for &(offset, len) in ranges {
            let digest = dmm_volume::digest(&*image, offset, len)
                .await
                .map_err(|e| {
                    Error::caused(ErrorKind::Invalid, "cannot hash the received image", e)
                })?;
            digests.push(digest);
        }
        Ok(digests)
    }

    /// The handoff: serves the volume received from `peer` under its
    /// export name, to any client, each request going through the
    /// sender's export (at `owner_nbd`) until the commit. Asking again is
    /// answered the same.
    pub async fn serve(&self, peer: &str, export: &str, owner_nbd: &str) -> Result<()> {
        let (mut reception, _) = self.received(peer, export)?;
        if let Some(existing) = self.exports.find(export) {
            return match existing.description == reception.path {
                true => Ok(()),
                false => Err(Error::new(
                    ErrorKind::Conflict,
                    format!("this node already has an export named {export}"),
                )),
            };
        }
        reception.stage = Stage::Serving;
        reception.owner_nbd = Some(owner_nbd.to_owned());
        if let Some(node) = self.node {
            // The sender made this node the owner before asking: read it
            // now rather than at the next renewal, so the fence admits
            // the first requests.
            node.cluster
                .owner(export)
                .await
                .map_err(crate::cluster::unavailable)?;
        }
        let owner = self.connect_owner(&reception).await?;
        self.catalog
            .record_reception(&reception)
            .map_err(catalog_error)?;
        self.hand(&reception, owner)?;
        tracing::info!(%peer, %export, path = %reception.path,
            "serving a volume handed over, through its sender until it commits");
        Ok(())
    }

    /// The sender's export of the volume, over NBD with TLS.
    async fn connect_owner(&self, reception: &Reception) -> Result<Arc<dyn BlockStore>> {
        let nbd = reception.owner_nbd.as_deref().unwrap_or_default();
        let uri = self
            .peers
            .nbd_uri(&reception.peer, nbd, &reception.export)?;
        let store = NbdStore::connect_uri(&uri).await.map_err(|e| {
            Error::caused(
                ErrorKind::Failed,
                format!(
                    "cannot reach {}'s export {}",
                    reception.peer, reception.export
                ),
                e,
            )
        })?;
        // A cut network fails the requests of the clients served here
        // instead of holding them until TCP notices.
        Ok(Arc::new(store.replies_within(OWNER_REPLY_WITHIN)))
    }

    /// Serves a volume through its sender's export.
    fn hand(&self, reception: &Reception, owner: Arc<dyn BlockStore>) -> Result<()> {
        let handed = Arc::new(Handed::new(owner));
        self.publish(reception, handed.clone())?;
        self.handoffs
            .0
            .lock()
            .insert(reception.export.clone(), handed);
        Ok(())
    }

    /// Serves a volume under its export name.
    fn publish(&self, reception: &Reception, store: Arc<dyn BlockStore>) -> Result<()> {
        let served =
            Export::new(reception.export.clone(), store).with_description(reception.path.clone());
        self.exports
            .insert(served)
            .map(drop)
            .map_err(|e| Error::caused(ErrorKind::Conflict, "cannot export it", e))
    }

    /// The image of a volume this node owns, as it serves it: in a
    /// cluster, fenced. (Until the commit every request goes through the
    /// sender's export, which the sender fences.)
    fn owned(&self, export: &str, image: Arc<dyn BlockStore>) -> Arc<dyn BlockStore> {
        match self.node {
            Some(node) => node.fenced(export, image),
            None => image,
        }
    }

    /// The commit: the volume handed over is served from the local image
    /// alone from now on, clients connected meanwhile included.
    pub fn own(&self, peer: &str, export: &str) -> Result<()> {
        let (mut reception, image) = self.received(peer, export)?;
        if reception.stage == Stage::Owned {
            return Ok(());
        }
        let image = self.owned(export, image);
        let handed = self.handoffs.0.lock().remove(export);
        match handed {
            Some(handed) => handed.settle(image),
            None if self.exports.find(export).is_none() => self.publish(&reception, image)?,
            None => {}
        }
        reception.stage = Stage::Owned;
        reception.owner_nbd = None;
        self.catalog
            .record_reception(&reception)
            .map_err(catalog_error)?;
        tracing::info!(%peer, %export, path = %reception.path, "this node owns the volume now");
        Ok(())
    }

    /// The sender is done with the volume: the reception ends; a volume
    /// this node does not own stops being served (its image stays).
    pub fn release(&self, peer: &str, export: &str) -> Result<()> {
        let Some(reception) = self
            .catalog
            .reception(peer, export)
            .map_err(catalog_error)?
        else {
            return Ok(());
        };
        self.exports.remove(&export_name(peer, export));
        self.handoffs.0.lock().remove(export);
        if reception.stage != Stage::Owned
            && self
                .exports
                .find(export)
                .is_some_and(|e| e.description == reception.path)
        {
            self.exports.remove(export);
        }
        self.catalog
            .forget_reception(peer, export)
            .map_err(catalog_error)?;
        tracing::info!(%peer, %export, path = %reception.path, stage = reception.stage.as_str(),
            "reception released by its sender");
        Ok(())
    }
}

/// Offers again, after a restart, every reception the catalog has. One
/// handed over and not committed is served once its sender's export
/// answers (tried in the background until it does).
pub fn restore(receiver: &Receiver<'_>) -> Result<Vec<Reception>> {
    let mut waiting = Vec::new();
    for reception in receiver.catalog.receptions().map_err(catalog_error)? {
        let image = FileStore::open(Path::new(&reception.path), OpenOptions { read_only: false })
            .map_err(|e| {
            Error::caused(
                ErrorKind::Failed,
                format!("cannot open {}", reception.path),
                e,
            )
        })?;
        let image: Arc<dyn BlockStore> = Arc::new(image);
        receiver.offer(&reception, image.clone())?;
        match reception.stage {
            Stage::Receiving => {}
            Stage::Owned => {
                let image = receiver.owned(&reception.export, image);
                receiver.publish(&reception, image)?
            }
            Stage::Serving => waiting.push(reception),
        }
    }
    Ok(waiting)
}

/// Serves a volume handed over once its sender's export answers, unless
/// its reception moved on meanwhile.
pub async fn serve_when_owner_answers(receiver: &Receiver<'_>, reception: Reception) {
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        let still = receiver
            .catalog
            .reception(&reception.peer, &reception.export);
        if !matches!(still, Ok(Some(ref r)) if r.stage == Stage::Serving) {
            return;
        }
        match receiver.connect_owner(&reception).await {
            Ok(owner) => {
                if let Err(err) = receiver.hand(&reception, owner) {
                    tracing::warn!(export = %reception.export, "{err}");
                }
                return;
            }
            Err(err) => tracing::warn!(export = %reception.export,
                "a volume handed over waits for its sender: {err}"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(10));
    }
}

/// The store of a volume handed over: the sender's export until the
/// commit, then the local image. Requests in flight at the switch finish
/// where they started; the sender's engine sends them to the image anyway.
pub struct Handed {
    current: RwLock<Arc<dyn BlockStore>>,
    target: String,
    capabilities: Capabilities,
}

impl Handed {
    fn new(owner: Arc<dyn BlockStore>) -> Handed {
        Handed {
            target: owner.target().to_owned(),
            capabilities: owner.capabilities(),
            current: RwLock::new(owner),
        }
    }

    fn settle(&self, image: Arc<dyn BlockStore>) {
        *self.current.write() = image;
    }

    fn now(&self) -> Arc<dyn BlockStore> {
        self.current.read().clone()
    }
}

#[async_trait]
impl BlockStore for Handed {
    fn target(&self) -> &str {
        &self.target
    }

    fn size(&self) -> u64 {
        self.now().size()
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    async fn read(&self, offset: u64, len: usize) -> dmm_store::Result<Vec<u8>> {
        self.now().read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> dmm_store::Result<()> {
        self.now().write(offset, data, fua).await
    }

    async fn flush(&self) -> dmm_store::Result<()> {
        self.now().flush().await
    }

    async fn discard(&self, offset: u64, len: u64, fua: bool) -> dmm_store::Result<()> {
        self.now().discard(offset, len, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> dmm_store::Result<()> {
        self.now().write_zeroes(offset, len, mode, fua).await
    }

    async fn extents(&self, offset: u64, len: u64) -> dmm_store::Result<Vec<Extent>> {
        self.now().extents(offset, len).await
    }
}

fn node_name(peers: &Peers) -> String {
    peers.node.clone().unwrap_or_else(|| "this node".to_owned())
}

/// The image at `path`: an existing one must be at least the size; a new
/// one is made sparse, where there is room for the allocated bytes.
fn open_or_create(path: &Path, request: &ReceiveRequest) -> Result<Arc<dyn BlockStore>> {
    let at = path.display();
    if !path.exists() {
        let parent = path.parent().unwrap_or(Path::new("/"));
        let free = rustix::fs::statvfs(parent)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .map_err(|e| {
                Error::caused(
                    ErrorKind::Invalid,
                    format!("cannot use {}", parent.display()),
                    std::io::Error::from(e),
                )
            })?;
        if free < request.allocated {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{} has {free} bytes free, the volume needs {}",
                    parent.display(),
                    request.allocated
                ),
            ));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .and_then(|file| file.set_len(request.size))
            .map_err(|e| Error::caused(ErrorKind::Failed, format!("cannot create {at}"), e))?;
    }
    let store = FileStore::open(path, OpenOptions { read_only: false })
        .map_err(|e| Error::caused(ErrorKind::Failed, format!("cannot open {at}"), e))?;
    if store.size() < request.size {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "{at} holds {} bytes, the volume {}",
                store.size(),
                request.size
            ),
        ));
    }
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> Peers {
        Peers {
            node: Some("node-b".into()),
            nbd: Some("10.0.0.2:10809".into()),
            nbd_tls_required: true,
            ..Peers::default()
        }
    }

    fn asking(path: &Path, size: u64) -> ReceiveRequest {
        ReceiveRequest {
            path: path.display().to_string(),
            size,
            allocated: 4096,
            export: "vm1".into(),
        }
    }

    #[test]
    fn a_reception_is_checked_made_once_and_offered_to_its_peer_only() {
        let dir = tempfile::tempdir().unwrap();
        let exports = ExportTable::new();
        let catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        let handoffs = Handoffs::default();
        let (node, plain) = (
            peers(),
            Peers {
                nbd_tls_required: false,
                ..peers()
            },
        );
        let at = |peers| Receiver {
            catalog: &catalog,
            exports: &exports,
            peers,
            handoffs: &handoffs,
            node: None,
        };
        let path = dir.path().join("vm1.raw");
        let request = asking(&path, 1 << 20);
        let err = at(&plain).receive("node-a", &request, &[]).unwrap_err();
        assert!(err.to_string().contains("TLS required"), "{err}");
        let relative = ReceiveRequest {
            path: "vm1.raw".into(),
            ..request.clone()
        };
        let err = at(&node).receive("node-a", &relative, &[]).unwrap_err();
        assert!(err.to_string().contains("not an absolute path"), "{err}");
        let in_use = [request.path.clone()];
        let err = at(&node).receive("node-a", &request, &in_use).unwrap_err();
        assert!(
            err.to_string().contains("in use by a migration on node-b"),
            "{err}"
        );

        let receiving = at(&node).receive("node-a", &request, &[]).unwrap();
        assert_eq!(receiving.export, "receive.node-a.vm1");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            1 << 20,
            "made sparse"
        );
        let export = exports.find(&receiving.export).unwrap();
        assert!(export.admits(&["node-a".into()]) && !export.admits(&["node-c".into()]));
        // Asked again (the sender restarted): the same export.
        assert_eq!(
            at(&node).receive("node-a", &request, &[]).unwrap(),
            receiving
        );
        // The same export name for another path: refused.
        let other = asking(&dir.path().join("other.raw"), 1 << 20);
        let err = at(&node).receive("node-a", &other, &[]).unwrap_err();
        assert!(err.to_string().contains("already receives"), "{err}");
        // An existing image smaller than the volume: refused.
        let small = dir.path().join("small.raw");
        std::fs::write(&small, vec![0u8; 4096]).unwrap();
        let bigger = ReceiveRequest {
            export: "vm2".into(),
            ..asking(&small, 1 << 20)
        };
        let err = at(&node).receive("node-a", &bigger, &[]).unwrap_err();
        assert!(err.to_string().contains("holds 4096 bytes"), "{err}");
    }
}

#[cfg(test)]
mod stages {
    use super::*;

    #[tokio::test]
    async fn a_reception_hashes_is_owned_survives_a_restart_and_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        let (exports, handoffs) = (ExportTable::new(), Handoffs::default());
        let peers = Peers {
            node: Some("node-b".into()),
            nbd: Some("10.0.0.2:10809".into()),
            nbd_tls_required: true,
            ..Peers::default()
        };
        let receiver = Receiver {
            catalog: &catalog,
            exports: &exports,
            peers: &peers,
            handoffs: &handoffs,
            node: None,
        };
        let path = dir.path().join("vm1.raw");
        let request = ReceiveRequest {
            path: path.display().to_string(),
            size: 1 << 20,
            allocated: 4096,
            export: "vm1".into(),
        };
        receiver.receive("node-a", &request, &[]).unwrap();
        let image = exports.find("receive.node-a.vm1").unwrap().store.clone();
        image
            .write(4096, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        let ranges = [(0, 65536), (65536, 65536)];
        let digests = receiver.digests("node-a", "vm1", &ranges).await.unwrap();
        assert_eq!(
            digests[0],
            dmm_volume::digest(&*image, 0, 65536).await.unwrap()
        );
        assert_eq!(
            digests[1],
            blake3::hash(&[0u8; 65536]),
            "a hole hashes as zeroes"
        );
        let err = receiver
            .digests("node-c", "vm1", &ranges)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("nothing is received from node-c"),
            "{err}"
        );
        let too_many = vec![(0, 512); MOST_DIGESTS + 1];
        assert!(receiver.digests("node-a", "vm1", &too_many).await.is_err());

        // The commit without a handoff seen (it failed): served from the image.
        receiver.own("node-a", "vm1").unwrap();
        assert!(exports.find("vm1").is_some());
        // A restart: both exports offered again from the catalog.
        let (again, handoffs) = (ExportTable::new(), Handoffs::default());
        let restarted = Receiver {
            exports: &again,
            handoffs: &handoffs,
            ..receiver
        };
        assert!(restore(&restarted).unwrap().is_empty());
        assert!(again.find("receive.node-a.vm1").is_some());
        assert_eq!(again.find("vm1").unwrap().description, request.path);
        // Released by the sender: the reception goes, the owned volume stays.
        restarted.release("node-a", "vm1").unwrap();
        assert!(again.find("receive.node-a.vm1").is_none());
        assert!(again.find("vm1").is_some());
        assert!(catalog.receptions().unwrap().is_empty());
    }
}
