//! The other dmm daemons this one knows: each by its name (the name its
//! certificate is valid for) and the address of its API. Daemons talk to
//! each other over their TCP APIs with mutual TLS: the caller presents its
//! node certificate (`client-cert.pem`), the callee accepts it on the
//! `/api/peer/` routes only if the certificate is valid for a name in its
//! own list of peers, and the caller checks the callee's certificate
//! against the peer's name. Admins keep their bearer token; a peer's
//! certificate grants no admin route.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::client::{Client, Endpoint};
use crate::error::{Error, ErrorKind, Result};
use crate::receive::ReceiveRequest;

/// The protocol version daemons speak on `/api/peer/`.
pub const PROTOCOL: u32 = 1;

/// This node and its peers.
#[derive(Debug, Default)]
pub struct Peers {
    /// This node's name, as its certificates say.
    pub node: Option<String>,
    /// Peer name → its API's TCP address.
    pub addresses: BTreeMap<String, String>,
    /// Where this node serves NBD over TCP, and whether TLS is required
    /// there, for peers that will read or write its exports.
    pub nbd: Option<String>,
    pub nbd_tls_required: bool,
    /// How this node calls its peers (its client certificate, their CA),
    /// and the directory that holds them (for the NBD client's URI).
    pub client: Option<Arc<rustls::ClientConfig>>,
    pub certificates: Option<std::path::PathBuf>,
}

/// What a daemon says about itself to a peer (`GET /api/peer/hello`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub node: Option<String>,
    pub version: String,
    pub protocol: u32,
    /// Its NBD TCP listener, if any.
    pub nbd: Option<String>,
    pub nbd_tls_required: bool,
}

/// A peer as `dmm peers` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub address: String,
    /// Its answer, when it answered.
    pub hello: Option<Hello>,
    /// Why it did not, on one line.
    pub error: Option<String>,
}

impl Peers {
    /// The configured peer a certificate valid for `names` belongs to.
    pub fn recognize(&self, names: &[String]) -> Option<&str> {
        self.addresses
            .keys()
            .find(|peer| names.contains(peer))
            .map(String::as_str)
    }

    pub fn hello(&self) -> Hello {
        Hello {
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: PROTOCOL,
            nbd: self.nbd.clone(),
            nbd_tls_required: self.nbd_tls_required,
        }
    }

    /// A client of peer `name`'s API.
    pub fn client(&self, name: &str) -> Option<Client> {
        let address = self.addresses.get(name)?;
        Some(Client::new(Endpoint::Peer {
            address: address.clone(),
            name: name.to_owned(),
            tls: self.client.clone()?,
        }))
    }

    /// The peer and the path of a `NODE:/PATH` target, when NODE is a peer.
    pub fn peer_target<'a>(&self, target: &'a str) -> Option<(&'a str, &'a str)> {
        let (node, path) = target.split_once(':')?;
        (self.addresses.contains_key(node) && path.starts_with('/')).then_some((node, path))
    }

    /// Asks `peer` who it is (it must speak this node's peer protocol),
    /// then to receive a volume into `path`; returns the NBD URI (TLS, this
    /// node's certificates, the peer's name checked) of the export it
    /// offers for it.
    pub async fn prepare_target(&self, peer: &str, request: &ReceiveRequest) -> Result<String> {
        let unknown = || {
            Error::new(
                ErrorKind::Invalid,
                format!("{peer} is not a peer of this node"),
            )
        };
        let client = self.client(peer).ok_or_else(unknown)?;
        let cannot = |why: String| {
            Error::new(
                ErrorKind::Failed,
                format!("{peer} cannot receive {}: {why}", request.path),
            )
        };
        let hello = client
            .peer_hello()
            .await
            .map_err(|e| cannot(e.to_string()))?;
        if hello.protocol != PROTOCOL {
            return Err(cannot(format!(
                "it speaks peer protocol {} (this node {PROTOCOL})",
                hello.protocol
            )));
        }
        let receiving = client
            .peer_receive(request)
            .await
            .map_err(|e| cannot(e.to_string()))?;
        self.nbd_uri(peer, &receiving.nbd, &receiving.export)
    }

    /// The NBD URI of `export` on `peer`'s listener `nbd`: TLS with this
    /// node's certificates, the peer's name checked.
    pub fn nbd_uri(&self, peer: &str, nbd: &str, export: &str) -> Result<String> {
        let (Some(dir), Some(api)) = (self.certificates.as_deref(), self.addresses.get(peer))
        else {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("{peer} is not a peer of this node"),
            ));
        };
        let nbd = reachable(nbd, api);
        Ok(format!(
            "nbds://{nbd}/{export}?tls-certificates={}&tls-hostname={peer}",
            dir.display()
        ))
    }

    /// Asks every peer who it is.
    pub async fn survey(&self) -> Vec<PeerStatus> {
        let asks = self.addresses.iter().map(|(name, address)| async move {
            let answer = match self.client(name) {
                Some(client) => client.peer_hello().await.map_err(|e| e.to_string()),
                None => Err("no client certificate to call peers with".to_owned()),
            };
            let (hello, error) = match answer {
                Ok(hello) if hello.protocol != PROTOCOL => (
                    Some(hello.clone()),
                    Some(format!(
                        "speaks peer protocol {} (this node {PROTOCOL})",
                        hello.protocol
                    )),
                ),
                Ok(hello) => (Some(hello), None),
                Err(error) => (None, Some(error)),
            };
            PeerStatus {
                name: name.clone(),
                address: address.clone(),
                hello,
                error,
            }
        });
        futures::future::join_all(asks).await
    }
}

/// The NBD address `nbd` a peer gave, with its host replaced by the host of
/// its API address when it listens on every interface (0.0.0.0, [::]).
fn reachable(nbd: &str, api: &str) -> String {
    let Ok(address) = nbd.parse::<std::net::SocketAddr>() else {
        return nbd.to_owned();
    };
    if !address.ip().is_unspecified() {
        return nbd.to_owned();
    }
    let host = api.rsplit_once(':').map_or(api, |(host, _)| host);
    format!("{host}:{}", address.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_target_names_a_known_node_and_an_absolute_path() {
        let peers = Peers {
            addresses: BTreeMap::from([("node-b".to_owned(), "10.0.0.2:7001".to_owned())]),
            ..Peers::default()
        };
        assert_eq!(
            peers.peer_target("node-b:/srv/vm1.raw"),
            Some(("node-b", "/srv/vm1.raw"))
        );
        assert_eq!(peers.peer_target("node-c:/srv/vm1.raw"), None);
        assert_eq!(peers.peer_target("node-b:vm1.raw"), None);
        assert_eq!(peers.peer_target("/srv/vm1.raw"), None);
        assert_eq!(
            reachable("0.0.0.0:10809", "10.0.0.2:7001"),
            "10.0.0.2:10809"
        );
        assert_eq!(
            reachable("10.0.0.3:10809", "10.0.0.2:7001"),
            "10.0.0.3:10809"
        );
    }
}
