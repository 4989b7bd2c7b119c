//! Chunk digests, and digests computed where a store lives.
//!
//! Verification compares each chunk both stores hold by its BLAKE3 digest
//! ([`digest`]). When the destination is on another node, reading it back
//! to hash it would move the volume a second time: a [`RemoteDigests`]
//! asks that node to hash its own chunks, so only the digests cross the
//! network. [`Lookahead`] asks for many chunks per call, the ones a sweep
//! is about to verify, and hands each digest out once.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use dmm_store::{BlockStore, Error, ErrorKind, Op, Result};
use roaring::RoaringTreemap;

use crate::chunks::{ChunkMap, ChunkState};
use crate::device::whole_extents;

/// How many chunks one call to a [`RemoteDigests`] asks for at most.
pub const DIGESTS_PER_CALL: usize = 64;

/// How many digests fetched ahead are kept before those behind the
/// sweep are dropped.
const KEPT_AHEAD: usize = 4 * DIGESTS_PER_CALL;

/// The BLAKE3 digest of `len` bytes at `offset`: holes and zero extents
/// hash as the zeroes they read as, so a sparse and a full copy of the
/// same data have the same digest.
pub async fn digest(store: &dyn BlockStore, offset: u64, len: u64) -> Result<blake3::Hash> {
    let extents = whole_extents(store, offset, len).await?;
    let mut hasher = blake3::Hasher::new();
    for extent in extents {
        if extent.kind.reads_as_zero() {
            hasher.update(&vec![0u8; extent.len as usize]);
        } else {
            hasher.update(&store.read(extent.offset, extent.len as usize).await?);
        }
    }
    Ok(hasher.finalize())
}

/// Digests ([`digest`]) of ranges of a store computed by whatever holds
/// it (a peer node hashing its own image).
#[async_trait]
pub trait RemoteDigests: Send + Sync {
    /// One digest per range, in order.
    async fn digests(&self, ranges: Vec<(u64, u64)>) -> Result<Vec<blake3::Hash>>;
}

/// A [`RemoteDigests`] asked for the chunks after the one wanted too,
/// those still held by both stores, up to [`DIGESTS_PER_CALL`] at once.
/// Each digest is handed out once: a digest fetched ahead may be older
/// than the chunk by the time it is used, which the unlocked comparison
/// tolerates (a chunk that changed meanwhile left `Both` and is not
/// compared; one that differs is compared again, locked, with a digest
/// asked for then).
///
/// A sweep verifies a few chunks at once, so they are asked for nearly,
/// not exactly, in order: the chunks handed out in this sweep are
/// remembered and not fetched again; a chunk asked for a second time
/// starts a new sweep.
///
/// Locks: `fetched` is taken with no chunk lock held and never under the
/// clients' gate; the locked comparison ([`Lookahead::now`]) does not take
/// it. Its wait is bounded by the remote's own limit (a peer call gives up
/// after 10 s), and a stop request ends the sweep that waits.
pub(crate) struct Lookahead {
    remote: Arc<dyn RemoteDigests>,
    fetched: tokio::sync::Mutex<Fetched>,
}

/// Digests fetched ahead and not yet handed out, and the chunks handed
/// out in the current sweep.
#[derive(Default)]
struct Fetched {
    ahead: HashMap<u64, blake3::Hash>,
    handed: RoaringTreemap,
}

impl Fetched {
    /// The digest of `chunk` if it was fetched ahead.
    fn take(&mut self, chunk: u64) -> Option<blake3::Hash> {
        if self.handed.contains(chunk) {
            *self = Fetched::default();
        }
        if self.ahead.len() >= KEPT_AHEAD {
            // Left behind: chunks written since they were fetched.
            self.ahead.retain(|&kept, _| kept > chunk);
        }
        let hash = self.ahead.remove(&chunk);
        self.handed.insert(chunk);
        hash
    }

    /// `chunk` and the chunks after it held by both stores that were
    /// neither fetched nor handed out in this sweep.
    fn wanted(&self, chunks: &ChunkMap, chunk: u64) -> Vec<u64> {
        let mut wanted = vec![chunk];
        let mut next = chunk + 1;
        while wanted.len() < DIGESTS_PER_CALL {
            let Some(found) = chunks.next_in(ChunkState::Both, next) else {
                break;
            };
            if !self.handed.contains(found) && !self.ahead.contains_key(&found) {
                wanted.push(found);
            }
            next = found + 1;
        }
        wanted
    }
}

impl Lookahead {
    pub(crate) fn new(remote: Arc<dyn RemoteDigests>) -> Lookahead {
        Lookahead {
            remote,
            fetched: tokio::sync::Mutex::new(Fetched::default()),
        }
    }

    /// The digest of `chunk`, fetched with those after it if it was not.
    pub(crate) async fn ahead(&self, chunks: &ChunkMap, chunk: u64) -> Result<blake3::Hash> {
        let mut fetched = self.fetched.lock().await;
        if let Some(hash) = fetched.take(chunk) {
            return Ok(hash);
        }
        let wanted = fetched.wanted(chunks, chunk);
        let ranges = wanted.iter().map(|&c| chunks.bytes(c)).collect();
        let hashes = self.remote.digests(ranges).await?;
        let mut hashes = wanted.iter().copied().zip(hashes);
        let first = hashes.next().map(|(_, hash)| hash);
        fetched.ahead.extend(hashes);
        first.ok_or_else(|| no_answer(chunks, chunk))
    }

    /// The digest of `chunk` as it is now.
    pub(crate) async fn now(&self, chunks: &ChunkMap, chunk: u64) -> Result<blake3::Hash> {
        let (offset, len) = chunks.bytes(chunk);
        let hashes = self.remote.digests(vec![(offset, len)]).await?;
        hashes
            .first()
            .copied()
            .ok_or_else(|| no_answer(chunks, chunk))
    }
}

fn no_answer(chunks: &ChunkMap, chunk: u64) -> Error {
    let (offset, len) = chunks.bytes(chunk);
    Error::new(ErrorKind::Protocol, Op::Read, "remote digests")
        .at(offset, len)
        .with_detail("the node holding the store sent no digest for the range")
}
