//! The store of a volume as a node of a cluster serves it: each request
//! checked against the node's fence and its view of the owner, and, for a
//! request forwarded by another node, against the token it carries.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use bytes::Bytes;
use dmm_cluster::Token;
use dmm_store::{BlockStore, Capabilities, Extent, Op, ZeroMode};

use super::Node;

/// A store served only while the node may serve its volume (and, with a
/// token, only while that token is the current one).
pub(super) struct Fenced {
    inner: Arc<dyn BlockStore>,
    capabilities: Capabilities,
    node: Arc<Node>,
    volume: String,
    token: Option<Token>,
}

impl Fenced {
    pub(super) fn new(
        node: Arc<Node>,
        volume: &str,
        token: Option<Token>,
        inner: Arc<dyn BlockStore>,
    ) -> Fenced {
        Fenced {
            capabilities: inner.capabilities(),
            inner,
            node,
            volume: volume.to_owned(),
            token,
        }
    }

    /// EPERM, counted, unless this node may serve the request now.
    fn check(&self, op: Op) -> dmm_store::Result<()> {
        let refusals = &self.node.refusals;
        let (counter, why) = match self.node.cluster.serves(&self.volume) {
            Ok(current) if self.token.is_none_or(|token| token == current) => return Ok(()),
            Ok(current) => (
                &refusals.stale,
                format!(
                    "token {} of {} is not current ({current} is)",
                    self.token.unwrap_or_default(),
                    self.volume
                ),
            ),
            Err(err) if err.kind() == dmm_cluster::ErrorKind::Fenced => {
                (&refusals.fenced, err.to_string())
            }
            Err(err) => (&refusals.not_owner, err.to_string()),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(volume = %self.volume, %op, "refused: {why}");
        Err(dmm_store::Error::new(
            dmm_store::ErrorKind::PermissionDenied,
            op,
            self.inner.target(),
        )
        .with_detail(why))
    }
}

#[async_trait]
impl BlockStore for Fenced {
    fn target(&self) -> &str {
        self.inner.target()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    async fn read(&self, offset: u64, len: usize) -> dmm_store::Result<Vec<u8>> {
        self.check(Op::Read)?;
        self.inner.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> dmm_store::Result<()> {
        self.check(Op::Write)?;
        self.inner.write(offset, data, fua).await
    }

    async fn flush(&self) -> dmm_store::Result<()> {
        self.check(Op::Flush)?;
        self.inner.flush().await
    }

    async fn discard(&self, offset: u64, len: u64, fua: bool) -> dmm_store::Result<()> {
        self.check(Op::Discard)?;
        self.inner.discard(offset, len, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> dmm_store::Result<()> {
        self.check(Op::WriteZeroes)?;
        self.inner.write_zeroes(offset, len, mode, fua).await
    }

    async fn extents(&self, offset: u64, len: u64) -> dmm_store::Result<Vec<Extent>> {
        self.check(Op::Extents)?;
        self.inner.extents(offset, len).await
    }

    async fn cache(&self, offset: u64, len: u64) -> dmm_store::Result<()> {
        self.check(Op::Cache)?;
        self.inner.cache(offset, len).await
    }
}
