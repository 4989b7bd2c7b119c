//! The destination side of a volume moving between nodes: a peer asks this
//! node to receive a volume into a local path (`POST /api/peer/receive`),
//! this node checks that it can (the path absolute, not in use by any of
//! its migrations or exports, the size and the space there), creates the
//! image if it is missing, and offers it as an NBD export that only that
//! peer's certificate can see, on its TLS NBD listener. The peer's own
//! migration then copies into that export.

use std::path::Path;
use std::sync::Arc;

use dmm_nbd::{Export, ExportTable};
use dmm_store::{BlockStore, FileStore, OpenOptions};
use serde::{Deserialize, Serialize};

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

/// The export a volume from `peer` named `export` is received under.
fn export_name(peer: &str, export: &str) -> String {
    format!("receive.{peer}.{export}")
}

/// Prepares the reception of a volume from `peer`. Asking again for the
/// same path gives the same export (a sender that restarts asks again).
pub fn receive(
    peer: &str,
    request: &ReceiveRequest,
    exports: &ExportTable,
    paths_in_use: &[String],
    peers: &Peers,
) -> Result<Receiving> {
    let refuse = |why: String| Error::new(ErrorKind::Conflict, why);
    let Some(nbd) = peers.nbd.clone().filter(|_| peers.nbd_tls_required) else {
        return Err(refuse(format!(
            "{} serves no NBD listener with TLS required (--nbd-listen with --tls=require)",
            node_name(peers)
        )));
    };
    let name = export_name(peer, &request.export);
    if let Some(existing) = exports.find(&name) {
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
    if paths_in_use.contains(&request.path) {
        return Err(refuse(format!(
            "{} is in use by a migration on {}",
            request.path,
            node_name(peers)
        )));
    }
    let store = open_or_create(path, request)?;
    let export = Export::new(name.clone(), store)
        .with_description(request.path.clone())
        .only_for(vec![peer.to_owned()]);
    exports
        .insert(export)
        .map_err(|e| Error::caused(ErrorKind::Conflict, "cannot export it", e))?;
    tracing::info!(%peer, path = %request.path, export = %name, "receiving a volume");
    Ok(Receiving { export: name, nbd })
}

/// The handoff: serves the volume received from `peer` as `export` under
/// that name, to any client (the same store as the reception's, so the
/// sender's forwarded writes and new clients' writes meet in one place).
/// Asking again is answered the same.
pub fn serve(peer: &str, export: &str, exports: &ExportTable) -> Result<()> {
    let receiving = exports.find(&export_name(peer, export)).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("nothing is received from {peer} as {export}"),
        )
    })?;
    if let Some(existing) = exports.find(export) {
        return match Arc::ptr_eq(&existing.store, &receiving.store) {
            true => Ok(()),
            false => Err(Error::new(
                ErrorKind::Conflict,
                format!("this node already has an export named {export}"),
            )),
        };
    }
    let served = Export::new(export, receiving.store.clone())
        .with_description(receiving.description.clone());
    exports
        .insert(served)
        .map_err(|e| Error::caused(ErrorKind::Conflict, "cannot export it", e))?;
    tracing::info!(%peer, %export, path = %receiving.description, "serving a volume handed over");
    Ok(())
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
        let path = dir.path().join("vm1.raw");
        let request = asking(&path, 1 << 20);
        let plain = Peers {
            nbd_tls_required: false,
            ..peers()
        };
        let err = receive("node-a", &request, &exports, &[], &plain).unwrap_err();
        assert!(err.to_string().contains("TLS required"), "{err}");
        let relative = ReceiveRequest {
            path: "vm1.raw".into(),
            ..request.clone()
        };
        let err = receive("node-a", &relative, &exports, &[], &peers()).unwrap_err();
        assert!(err.to_string().contains("not an absolute path"), "{err}");
        let in_use = [request.path.clone()];
        let err = receive("node-a", &request, &exports, &in_use, &peers()).unwrap_err();
        assert!(
            err.to_string().contains("in use by a migration on node-b"),
            "{err}"
        );

        let receiving = receive("node-a", &request, &exports, &[], &peers()).unwrap();
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
            receive("node-a", &request, &exports, &[], &peers()).unwrap(),
            receiving
        );
        // The same export name for another path: refused.
        let other = asking(&dir.path().join("other.raw"), 1 << 20);
        let err = receive("node-a", &other, &exports, &[], &peers()).unwrap_err();
        assert!(err.to_string().contains("already receives"), "{err}");
        // An existing image smaller than the volume: refused.
        let small = dir.path().join("small.raw");
        std::fs::write(&small, vec![0u8; 4096]).unwrap();
        let bigger = ReceiveRequest {
            export: "vm2".into(),
            ..asking(&small, 1 << 20)
        };
        let err = receive("node-a", &bigger, &exports, &[], &peers()).unwrap_err();
        assert!(err.to_string().contains("holds 4096 bytes"), "{err}");
    }
}
