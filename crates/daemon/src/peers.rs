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
    /// How this node calls its peers (its client certificate, their CA).
    pub client: Option<Arc<rustls::ClientConfig>>,
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
