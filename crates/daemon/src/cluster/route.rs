//! Any node serves any volume: a client may ask any node's NBD listener
//! for a volume by name.
//!
//! - A node that does not serve the volume itself forwards each request
//!   to the owner's NBD listener (TLS, this node's client certificate),
//!   asking for `VOLUME@TOKEN`, the owner's token as this node last read
//!   it ([`Forwarding`]).
//! - A node asked for `VOLUME@TOKEN` by a peer serves the request only if
//!   the token is still current and its own fence is open; otherwise EPERM,
//!   counted as a stale-token refusal.
//! - A forwarding node that gets EPERM or loses the owner reads the owner
//!   again and retries, for at most [`FORWARD_WITHIN`]: a handoff moves
//!   its clients without them reconnecting.
//! - A request is forwarded at most once: a name with a token is never
//!   forwarded again, so there are no loops.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dmm_cluster::Token;
use dmm_nbd::{Export, ExportTable, NbdStore, Route};
use dmm_store::{BlockStore, Capabilities, Error, ErrorKind, Extent, Op, ZeroMode};
use tokio::time::Instant;

use super::Node;
use super::fenced::Fenced;
use crate::peers::Peers;

/// How long a forwarded request keeps trying to reach the owner.
pub const FORWARD_WITHIN: Duration = Duration::from_secs(10);

/// How long a dial to the owner may take.
const DIAL_WITHIN: Duration = Duration::from_secs(3);

/// Pause before another try of a forwarded request.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// The name a node forwards a request for `volume` under.
pub fn tokened(volume: &str, token: Token) -> String {
    format!("{volume}@{token}")
}

/// `VOLUME@TOKEN` split, if `name` is one.
fn parse_tokened(name: &str) -> Option<(&str, Token)> {
    let (volume, token) = name.rsplit_once('@')?;
    let token: Token = token.parse().ok()?;
    (!volume.is_empty() && token > 0).then_some((volume, token))
}

/// The route of a daemon's NBD export table in a cluster.
pub struct Router {
    node: Arc<Node>,
    peers: Arc<Peers>,
    exports: Weak<ExportTable>,
}

impl Router {
    /// Routes the names `exports` does not hold.
    pub fn install(node: Arc<Node>, peers: Arc<Peers>, exports: &Arc<ExportTable>) {
        let router = Router {
            node,
            peers,
            exports: Arc::downgrade(exports),
        };
        exports.set_route(Arc::new(router));
    }

    /// A peer's request under a token, served from this node's export of
    /// the volume while the token is current.
    fn tokened_request(
        &self,
        name: &str,
        volume: &str,
        token: Token,
        client: &[String],
    ) -> Option<Arc<Export>> {
        self.peers.recognize(client)?;
        let local = self.exports.upgrade()?.find(volume)?;
        let checked = Fenced::new(self.node.clone(), volume, Some(token), local.store.clone());
        Some(Arc::new(Export::new(name, Arc::new(checked))))
    }

    /// A volume another node owns, forwarded there.
    async fn to_owner(&self, volume: &str) -> Option<Arc<Export>> {
        let owner = self.node.cluster.owner(volume).await.ok()??;
        if owner.node == self.node.cluster.node() {
            return None;
        }
        let forwarding = Forwarding::open(self.node.clone(), self.peers.clone(), volume).await;
        match forwarding {
            Ok(forwarding) => Some(Arc::new(Export::new(volume, Arc::new(forwarding)))),
            Err(err) => {
                tracing::warn!(%volume, owner = %owner.node, "cannot forward to the owner: {err}");
                None
            }
        }
    }
}

#[async_trait]
impl Route for Router {
    async fn route(&self, name: &str, client: &[String]) -> Option<Arc<Export>> {
        match parse_tokened(name) {
            Some((volume, token)) => self.tokened_request(name, volume, token, client),
            None => self.to_owner(name).await,
        }
    }
}

/// The owner's export of a volume under its token, as this node reached it.
struct Link {
    token: Token,
    store: NbdStore,
}

/// How to reach the owner of a volume.
struct Reach {
    node: Arc<Node>,
    peers: Arc<Peers>,
    volume: String,
}

impl Reach {
    /// Reads the owner again and connects to its export under its token.
    async fn dial(&self) -> dmm_store::Result<Arc<Link>> {
        let cluster = &self.node.cluster;
        let unreachable = |why: String| {
            Error::new(ErrorKind::Disconnected, Op::Connect, self.volume.as_str()).with_detail(why)
        };
        let owner = cluster
            .owner(&self.volume)
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .ok_or_else(|| unreachable("no node owns it".to_owned()))?;
        if owner.node == cluster.node() {
            return Err(unreachable("this node owns it now; reconnect".to_owned()));
        }
        let nodes = cluster
            .nodes()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let nbd = nodes
            .iter()
            .find(|n| n.name == owner.node && n.up)
            .and_then(|n| n.record.as_ref()?.nbd.clone())
            .ok_or_else(|| unreachable(format!("its owner {} is down", owner.node)))?;
        let uri = self
            .peers
            .nbd_uri(&owner.node, &nbd, &tokened(&self.volume, owner.token))
            .map_err(|e| unreachable(e.line()))?;
        // Any failure to reach it (the owner not serving the volume yet,
        // say) is one more reason to read the owner again and retry.
        let store = tokio::time::timeout(DIAL_WITHIN, NbdStore::connect_uri(&uri))
            .await
            .map_err(|_| {
                unreachable(format!(
                    "{} did not answer within {DIAL_WITHIN:?}",
                    owner.node
                ))
            })?
            .map_err(|e| unreachable(e.to_string()))?;
        tracing::debug!(volume = %self.volume, owner = %owner.node, token = owner.token, "forwarding");
        Ok(Arc::new(Link {
            token: owner.token,
            store: store.replies_within(FORWARD_WITHIN),
        }))
    }

    /// The owner's token as this node last read it.
    fn token_seen(&self) -> Option<Token> {
        self.node.cluster.token_seen(&self.volume)
    }
}

/// A volume served by forwarding each request to its owner.
struct Forwarding {
    reach: Reach,
    size: u64,
    capabilities: Capabilities,
    link: parking_lot::Mutex<Option<Arc<Link>>>,
    /// One dial at a time; held across the dial, never with `link`.
    dialing: tokio::sync::Mutex<()>,
}

impl Forwarding {
    async fn open(
        node: Arc<Node>,
        peers: Arc<Peers>,
        volume: &str,
    ) -> dmm_store::Result<Forwarding> {
        let reach = Reach {
            node,
            peers,
            volume: volume.to_owned(),
        };
        let link = reach.dial().await?;
        Ok(Forwarding {
            reach,
            size: link.store.size(),
            capabilities: link.store.capabilities(),
            link: parking_lot::Mutex::new(Some(link)),
            dialing: tokio::sync::Mutex::new(()),
        })
    }

    /// The link to the owner under its current token (as last read).
    async fn current(&self) -> dmm_store::Result<Arc<Link>> {
        let linked = |token| self.link.lock().clone().filter(|l| Some(l.token) == token);
        if let Some(link) = linked(self.reach.token_seen()) {
            return Ok(link);
        }
        let _dialing = self.dialing.lock().await;
        if let Some(link) = linked(self.reach.token_seen()) {
            return Ok(link);
        }
        let link = self.reach.dial().await?;
        *self.link.lock() = Some(link.clone());
        Ok(link)
    }

    /// Forgets `link` if it is still the current one.
    fn drop_link(&self, link: &Arc<Link>) {
        let mut current = self.link.lock();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, link)) {
            *current = None;
        }
    }

    /// Runs `call` on the owner's export, dialing it again (after reading
    /// the owner again) when it refused the token or went away, for at
    /// most [`FORWARD_WITHIN`].
    async fn forward<T, F, Fut>(&self, call: F) -> dmm_store::Result<T>
    where
        F: Fn(Arc<Link>) -> Fut,
        Fut: std::future::Future<Output = dmm_store::Result<T>>,
    {
        let deadline = Instant::now() + FORWARD_WITHIN;
        loop {
            let outcome = match self.current().await {
                Ok(link) => {
                    let outcome = call(link.clone()).await;
                    if outcome.as_ref().is_err_and(|e| retried(e.kind())) {
                        self.drop_link(&link);
                    }
                    outcome
                }
                Err(err) => Err(err),
            };
            match outcome {
                Err(err) if retried(err.kind()) && Instant::now() + RETRY_AFTER < deadline => {
                    let reach = &self.reach;
                    tracing::debug!(volume = %reach.volume, "forwarding again: {err}");
                    let _ = reach.node.cluster.owner(&reach.volume).await;
                    tokio::time::sleep(RETRY_AFTER).await;
                }
                outcome => return outcome,
            }
        }
    }
}

/// Whether a failed forward is worth another try with the owner read again.
fn retried(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::PermissionDenied | ErrorKind::Disconnected | ErrorKind::Shutdown
    )
}

#[async_trait]
impl BlockStore for Forwarding {
    fn target(&self) -> &str {
        &self.reach.volume
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    async fn read(&self, offset: u64, len: usize) -> dmm_store::Result<Vec<u8>> {
        self.forward(|link| async move { link.store.read(offset, len).await })
            .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> dmm_store::Result<()> {
        self.forward(|link| {
            let data = data.clone();
            async move { link.store.write(offset, data, fua).await }
        })
        .await
    }

    async fn flush(&self) -> dmm_store::Result<()> {
        self.forward(|link| async move { link.store.flush().await })
            .await
    }

    async fn discard(&self, offset: u64, len: u64, fua: bool) -> dmm_store::Result<()> {
        self.forward(|link| async move { link.store.discard(offset, len, fua).await })
            .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> dmm_store::Result<()> {
        self.forward(|link| async move { link.store.write_zeroes(offset, len, mode, fua).await })
            .await
    }

    async fn extents(&self, offset: u64, len: u64) -> dmm_store::Result<Vec<Extent>> {
        self.forward(|link| async move { link.store.extents(offset, len).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokened_name_is_a_volume_and_a_positive_token() {
        assert_eq!(parse_tokened(&tokened("vm1", 42)), Some(("vm1", 42)));
        assert_eq!(parse_tokened("a@b@7"), Some(("a@b", 7)));
        for plain in ["vm1", "vm1@", "@7", "vm1@0", "vm1@-3", "vm1@x"] {
            assert_eq!(parse_tokened(plain), None, "{plain}");
        }
    }
}
